"""rules/sa/session_facts.py: the session a message file would have had at our gateway."""

from __future__ import annotations

import pytest

from gateway.errors import MailGateError
from rules.sa.received import TrustConfig
from rules.sa.session_facts import UNKNOWN_CLIENT, recipient_of, session_facts

LOCAL = ("Received: from localhost (localhost [127.0.0.1])\n\tby mx.example.org (Postfix) with ESMTP id A1B2C3\n"
         "\tfor <bob@example.org>; Tue, 12 Mar 2024 10:01:05 +0000 (UTC)\n")
FETCH = ("Received: from mx.example.org [127.0.0.1]\n\tby localhost with IMAP (fetchmail-6.4.37)\n"
         "\tfor <bob@localhost> (single-drop); Tue, 12 Mar 2024 10:01:04 +0000 (UTC)\n")
MX = ("Received: from mail1.sender.test (host66.sender.test [65.217.159.66])\n\tby mx.example.org (8.15.2/8.15.2) "
      "with ESMTP id h2F0c2x31856\n\tfor <bob@example.org>; Tue, 12 Mar 2024 10:01:03 +0000\n")
ORIGIN = ("Received: from laptop ([192.168.1.20])\n\tby mail1.sender.test (8.15.2/8.15.2) with ESMTP id h2F0c1x0001;"
          "\n\tTue, 12 Mar 2024 10:01:01 +0000\n")
BODY = "From: alice@sender.test\nTo: Team <team@example.org>\nSubject: hi\n\nhello\n"


def _raw(head: str) -> bytes:
    return (head + BODY).encode()


def test_the_client_is_the_hop_that_brought_the_message_in():
    f = session_facts(_raw("Return-Path: <alice@sender.test>\n" + LOCAL + FETCH + MX + ORIGIN))
    assert (f.client_ip, f.client_rdns, f.helo, f.client_source) == (
        "65.217.159.66", "host66.sender.test", "mail1.sender.test", "received[2]")
    assert f.sender == "alice@sender.test"


def test_configured_trust_moves_the_boundary():
    # our own MX is trusted: the client is the host that handed the message to it
    f = session_facts(_raw(MX + ORIGIN), TrustConfig.from_lists(trusted=["65.217.159.0/24"]))
    assert (f.client_ip, f.helo) == ("192.168.1.20", "laptop")


def test_loopback_only_when_the_message_came_from_there():
    f = session_facts(_raw(LOCAL))
    assert f.client_ip == "127.0.0.1" and f.client_source == "received[0]"
    # trusted hops only: the oldest, where the message started
    inside = session_facts(_raw(LOCAL + ORIGIN))
    assert inside.client_ip == "192.168.1.20"
    none = session_facts(_raw(""))
    assert (none.client_ip, none.client_source, none.helo) == (UNKNOWN_CLIENT, "none", None)


def test_recipient_order():
    assert recipient_of([("to", "team@example.org"), ("delivered-to", "bob@example.org"),
                         ("x-original-to", "Bob <b.smith@example.org>")]) == ("b.smith@example.org", "X-Original-To")
    # the oldest Delivered-To that is an address; ezmlm's "mailing list" ones are not recipients
    assert recipient_of([("delivered-to", "bob@localhost"), ("delivered-to", "bob@example.org"),
                         ("delivered-to", "mailing list list@lists.example.net")]) == ("bob@example.org",
                                                                                       "Delivered-To")
    assert recipient_of([("to", "Team <team@example.org>")]) == ("team@example.org", "To")
    assert recipient_of([("to", "undisclosed-recipients:;")]) == ("postmaster@localhost", "default")
    f = session_facts(_raw("Delivered-To: bob@example.org\n" + MX))
    assert (f.rcpt, f.rcpt_source) == ("bob@example.org", "Delivered-To")


def test_options_win_and_are_checked():
    f = session_facts(_raw(MX), client_ip="198.51.100.7", helo="given.test", rcpt="<carol@example.org>")
    assert (f.client_ip, f.helo, f.rcpt, f.client_source, f.rcpt_source) == (
        "198.51.100.7", "given.test", "carol@example.org", "--client-ip", "--rcpt")
    # a given client named in the chain keeps that hop's rDNS and HELO
    named = session_facts(_raw(MX + ORIGIN), client_ip="65.217.159.66")
    assert (named.client_rdns, named.helo) == ("host66.sender.test", "mail1.sender.test")
    with pytest.raises(MailGateError, match="--client-ip 'mx.example.org': not an IPv4 or IPv6 address"):
        session_facts(_raw(MX), client_ip="mx.example.org")
    with pytest.raises(MailGateError, match="--rcpt 'bob': not an address"):
        session_facts(_raw(MX), rcpt="bob")


def test_envelope_sender_as_spamassassin_guesses_it():
    exim = ("Received: from mail.sender.test ([198.51.100.20] helo=smtp.sender.test)\n\tby mx.example.org with esmtps "
            "(Exim 4.96)\n\t(envelope-from <bounce-7@lists.sender.test>)\n\tid 1rk2Xy-000AbC-2Z\n\tfor "
            "bob@example.org; Tue, 12 Mar 2024 10:01:02 +0000\n")
    # the boundary MTA's record of MAIL FROM wins over the final delivery's Return-Path
    assert session_facts(_raw("Return-Path: <alice@sender.test>\n" + exim)).sender == "bounce-7@lists.sender.test"
    # a Return-Path below a Received header was not written by the final delivery
    assert session_facts(_raw(MX + "Return-Path: <alice@sender.test>\n")).sender == ""
    assert session_facts(_raw("Return-Path: <>\n" + MX)).sender == ""
