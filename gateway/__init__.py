"""MailGate: the SMTP gateway, its queue and delivery."""
