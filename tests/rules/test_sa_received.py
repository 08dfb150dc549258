"""rules/sa/received.py: Received headers read as SpamAssassin 4.0.1 reads them.

Each format is checked field by field, and the whole set, chained into
messages, against SpamAssassin itself (its Received.pm run by Perl on the
same files), with inferred and with configured trust.
"""

from __future__ import annotations

import subprocess

import pytest

from rules.sa.evals import EvalContext, run
from rules.sa.message import MessageView
from rules.sa.received import (FETCHER, SKIP, Networks, Relay, TrustConfig, parse_all, parse_message,
                               parse_network, parse_received_line, received_headers, walk)
from tests.support.programs import require_program

# one header per MTA format, as those MTAs write them (folded as they fold them)
FORMATS = {
    "postfix": "from mail-wr1-f54.google.com (mail-wr1-f54.google.com [209.85.221.54])\n\tby mx.example.org "
               "(Postfix) with ESMTPS id 4G5x2Y1abcz9sR\n\tfor <bob@example.org>; Tue, 12 Mar 2024 10:01:02 +0000 (UTC)",
    "postfix_unknown": "from bad.example (unknown [203.0.113.9])\n\tby mx.example.org (Postfix) with SMTP id 1A2B3C4D5E\n"
                       "\tfor <bob@example.org>; Tue, 12 Mar 2024 10:01:02 +0000 (UTC)",
    "postfix_ipv6": "from mail.example.net (mail.example.net [IPv6:2001:db8::25])\n\tby mx.example.org (Postfix) with "
                    "ESMTPS id 4G5x3Q; Tue, 12 Mar 2024 10:01:02 +0000 (UTC)",
    "postfix_auth": "from [192.168.1.20] (dsl-203-0-113-45.example.net [203.0.113.45])\n\t(Authenticated sender: "
                    "carol@example.net)\n\tby smtp.example.net (Postfix) with ESMTPSA id 4G5x3Z2bcd;\n"
                    "\tTue, 12 Mar 2024 09:59:00 +0000 (UTC)",
    "postfix_local": "by mx.example.org (Postfix, from userid 1000)\n\tid 4A1B2C3D; Tue, 12 Mar 2024 10:01:02 +0000",
    "google": "from mail-sor-f41.google.com (mail-sor-f41.google.com. [209.85.220.41])\n        by mx.google.com "
              "with SMTPS id a1sor123456wrx.12.2024.03.12.03.01.02\n        for <bob@gmail.com>\n"
              "        (Google Transport Security);\n        Tue, 12 Mar 2024 03:01:02 -0700 (PDT)",
    "google_internal": "by 2002:a05:6000:1a8e:b0:33e:7f5e:1234 with SMTP id f14csp123456wrx;\n"
                       "        Tue, 12 Mar 2024 03:01:02 -0700 (PDT)",
    "exchange_online": "from AM6PR02MB1234.eurprd02.prod.outlook.com (2603:10a6:20b:e0::12) by "
                       "AM6PR02MB5678.eurprd02.prod.outlook.com (2603:10a6:20b:e1::34) with Microsoft SMTP Server "
                       "(version=TLS1_2, cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id 15.20.7362.35; "
                       "Tue, 12 Mar 2024 10:01:02 +0000",
    "exchange_mapi": "from AM5PR0402MB2836.eurprd04.prod.outlook.com\n ([fe80::19bd:c588:dd17:5226]) by "
                     "AM5PR0402MB2836.eurprd04.prod.outlook.com\n ([fe80::19bd:c588:dd17:5226%6]) with mapi id "
                     "15.20.1943.023;\n Wed, 5 Jun 2019 10:17:08 +0000",
    "exchange_smtpsvc": "from inet-vrs-05.redmond.corp.microsoft.com ([157.54.6.157]) by "
                        "INET-IMC-05.redmond.corp.microsoft.com with Microsoft SMTPSVC(5.0.2195.6624);\n"
                        "\t Thu, 6 Mar 2003 12:02:35 -0800",
    "smtpsvc_pickup": "from mail pickup service by mail1.insuranceiq.com with Microsoft SMTPSVC;\n"
                      "\t Thu, 13 Feb 2003 19:05:39 -0500",
    "sendmail": "from mail1.insuranceiq.com (host66.insuranceiq.com [65.217.159.66] (may be forged))\n\tby "
                "dogma.slashnull.org (8.11.6/8.11.6) with ESMTP id h2F0c2x31856\n\tfor <jm@jmason.org>; "
                "Sat, 15 Mar 2003 00:38:03 GMT",
    "sendmail_auth": "from roissy (p573.as1.exs.dublin.eircom.net [159.134.226.61])\n\t(authenticated bits=0)\n\tby "
                     "slate.dublin.wbtsystems.com (8.12.6/8.12.6) with ESMTP id g9MFWcvb068860\n\tfor "
                     "<jm@jmason.org>; Tue, 22 Oct 2002 16:32:39 +0100 (IST)",
    "sendmail_ident": "from ran-out.mx.develooper.com (IDENT:qmailr@one.develooper.com [64.81.84.115])\n\tby "
                      "dogma.slashnull.org (8.11.6/8.11.6) with SMTP id h381Vvf19860\n\tfor <jm-cpan@jmason.org>; "
                      "Tue, 8 Apr 2003 02:31:57 +0100",
    "sendmail_no_rdns": "from mail.sxptt.zj.cn ([218.0.185.24])\n\tby dogma.slashnull.org (8.11.6/8.11.6) with ESMTP "
                        "id h2FH0Zx11330\n\tfor <webmaster@efi.ie>; Sat, 15 Mar 2003 17:00:41 GMT",
    "sendmail_submit": "(from jm@localhost)\n\tby home.example.com (8.12.11/8.12.11/Submit) id iBADHRP6011034;\n"
                       "\tFri, 10 Dec 2004 13:17:27 GMT",
    "exim3": "from dsl092-072-213.bos1.dsl.speakeasy.net ([66.92.72.213] helo=blazing.arsecandle.org)\n\tby "
             "sc8-sf-list1.sourceforge.net with esmtp (Cipher TLSv1:DES-CBC3-SHA:168) (Exim 3.31-VA-mm2 #1 (Debian))\n"
             "\tid 18lyuU-0007TI-00\n\tfor <SpamAssassin-talk@lists.sourceforge.net>; Thu, 20 Feb 2003 14:11:18 -0800",
    "exim4": "from mail.example.net ([198.51.100.20]:41234 helo=smtp.example.net)\n\tby mx.example.org with esmtps  "
             "(TLS1.3) tls TLS_AES_256_GCM_SHA384\n\t(Exim 4.96)\n\t(envelope-from <alice@example.net>)\n"
             "\tid 1rk2Xy-000AbC-2Z\n\tfor bob@example.org; Tue, 12 Mar 2024 10:01:02 +0000",
    "exim_bracket": "from [218.19.142.229] (helo=hotmail.com ident=yiuhyotp)\n\tby yzordderrex with smtp (Exim 3.35 #1 "
                    "(Debian)) id 194BE5-0005Zh-00; Sat, 12 Apr 2003 03:58:53 +0100",
    "exim_auth": "from [192.0.2.77] (helo=[10.0.0.3])\n\tby smtp.example.net with esmtpsa  (TLS1.2) tls "
                 "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384\n\t(Exim 4.94.2)\n\t(envelope-from <carol@example.net>)\n"
                 "\tid 1rk2Z0-0003xY-Ab; Tue, 12 Mar 2024 09:58:00 +0000",
    "exim_local": "from www-data by wwwmail.documenta.de with local (Exim 4.50)\n\tid 1GFbZc-0006QV-L8; "
                  "Tue, 22 Aug 2006 21:06:04 +0200",
    "qmail_helo": "from unknown (HELO feux01a-isp) (213.199.4.210)\n  by totor.bouissou.net with SMTP; "
                  "1 Nov 2003 07:05:19 -0000",
    "qmail_ident": "from x1-6-00-04-bd-d2-e0-a3.k317.webspeed.dk (benelli@80.167.158.170)\n  by totor.bouissou.net "
                   "with SMTP; 5 Nov 2003 23:18:42 -0000",
    "qmail_invoked": "(qmail 27981 invoked by uid 225); 14 Mar 2003 07:24:34 -0000",
    "domino": "from host.example.com ([192.0.2.33])\n          by notes.example.com (Lotus Domino Release 8.5.3FP6)\n"
              "          with ESMTP id 2024031210010200-12345 ;\n          Tue, 12 Mar 2024 10:01:02 +0100",
    "communigate": "from [192.168.1.104] (account nazgul HELO [192.168.1.104])\n  by somewhere.com (CommuniGate Pro "
                   "SMTP 3.5.7)\n  with ESMTP-TLS id 2088434; Fri, 07 Mar 2003 13:05:06 -0500",
    "mdaemon": "from acecomms [202.83.84.95] by mailscan.acenet.net.au [202.83.84.27] with SMTP (MDaemon.PRO.v5.0.6.R)"
               "\n for <spamassassin-talk@lists.sourceforge.net>; Fri, 21 Feb 2003 09:32:27 +1000",
    "fetchmail": "from phobos [127.0.0.1]\n\tby localhost with IMAP (fetchmail-5.9.0)\n\tfor jm@localhost "
                 "(single-drop); Thu, 13 Mar 2003 20:39:56 -0800 (PST)",
    "mailgate": "from client.sender.test (mail.sender.test [192.0.2.1])\r\n\tby mx.gateway.test (MailGate) with "
                "ESMTP id 4F2A9C1B7D\r\n\tfor <bob@example.test>;\r\n\tTue, 12 Mar 2024 10:01:02 +0000",
    "mailgate_no_rdns": "from client.sender.test ([192.0.2.1])\r\n\tby mx.gateway.test (MailGate) with SMTP id "
                        "4F2A9C1B7E;\r\n\tTue, 12 Mar 2024 10:01:02 +0000",
    "unparseable": "from weird-host (some comment) via UUCP; Tue, 12 Mar 2024 10:01:02 +0000",
}


def _one(name: str) -> Relay:
    relay = parse_received_line(FORMATS[name])
    assert isinstance(relay, Relay), (name, relay)
    return relay


def _fields(r: Relay) -> tuple:
    return (r.ip, r.rdns, r.helo, r.by, r.ident, r.envfrom, r.id, r.auth)


@pytest.mark.parametrize("name, expected", [
    ("postfix", ("209.85.221.54", "mail-wr1-f54.google.com", "mail-wr1-f54.google.com", "mx.example.org", "", None,
                 "4G5x2Y1abcz9sR", "")),
    ("postfix_unknown", ("203.0.113.9", "", "bad.example", "mx.example.org", "", None, "1A2B3C4D5E", "")),
    ("postfix_ipv6", ("2001:db8::25", "mail.example.net", "mail.example.net", "mx.example.org", "", None, "4G5x3Q",
                      "")),
    ("postfix_auth", ("203.0.113.45", "dsl-203-0-113-45.example.net", "!192.168.1.20!", "smtp.example.net", "", None,
                      "4G5x3Z2bcd", "ESMTPSA")),
    ("google", ("209.85.220.41", "mail-sor-f41.google.com", "mail-sor-f41.google.com", "mx.google.com", "", None,
                "a1sor123456wrx.12.2024.03.12.03.01.02", "")),
    # the TLS comment hides it from SpamAssassin's Microsoft SMTP Server format: its
    # generic qmail-like one reads the name as rDNS and HELO both
    ("exchange_online", ("2603:10a6:20b:e0::12", "AM6PR02MB1234.eurprd02.prod.outlook.com",
                         "AM6PR02MB1234.eurprd02.prod.outlook.com", "AM6PR02MB5678.eurprd02.prod.outlook.com", "",
                         None, "15.20.7362.35", "")),
    ("exchange_mapi", ("fe80::19bd:c588:dd17:5226", "", "AM5PR0402MB2836.eurprd04.prod.outlook.com",
                       "AM5PR0402MB2836.eurprd04.prod.outlook.com", "", None, "", "")),
    ("exchange_smtpsvc", ("157.54.6.157", "", "inet-vrs-05.redmond.corp.microsoft.com",
                          "INET-IMC-05.redmond.corp.microsoft.com", "", None, "", "")),
    ("sendmail", ("65.217.159.66", "host66.insuranceiq.com", "mail1.insuranceiq.com", "dogma.slashnull.org", "", None,
                  "h2F0c2x31856", "")),
    ("sendmail_auth", ("159.134.226.61", "p573.as1.exs.dublin.eircom.net", "roissy", "slate.dublin.wbtsystems.com",
                       "", None, "g9MFWcvb068860", "Sendmail")),
    ("sendmail_ident", ("64.81.84.115", "one.develooper.com", "ran-out.mx.develooper.com", "dogma.slashnull.org",
                        "qmailr", None, "h381Vvf19860", "")),
    ("sendmail_no_rdns", ("218.0.185.24", "", "mail.sxptt.zj.cn", "dogma.slashnull.org", "", None, "h2FH0Zx11330",
                          "")),
    ("exim3", ("66.92.72.213", "dsl092-072-213.bos1.dsl.speakeasy.net", "blazing.arsecandle.org",
               "sc8-sf-list1.sourceforge.net", "", None, "18lyuU-0007TI-00", "")),
    ("exim4", ("198.51.100.20", "mail.example.net", "smtp.example.net", "mx.example.org", "", "alice@example.net",
               "1rk2Xy-000AbC-2Z", "")),
    ("exim_bracket", ("218.19.142.229", "", "hotmail.com", "yzordderrex", "yiuhyotp", None, "194BE5-0005Zh-00", "")),
    ("exim_auth", ("192.0.2.77", "", "!10.0.0.3!", "smtp.example.net", "", "carol@example.net", "1rk2Z0-0003xY-Ab",
                   "esmtpsa")),
    ("qmail_helo", ("213.199.4.210", "", "feux01a-isp", "totor.bouissou.net", "", None, "", "")),
    ("qmail_ident", ("80.167.158.170", "x1-6-00-04-bd-d2-e0-a3.k317.webspeed.dk",
                     "x1-6-00-04-bd-d2-e0-a3.k317.webspeed.dk", "totor.bouissou.net", "benelli", None, "", "")),
    ("domino", ("192.0.2.33", "", "host.example.com", "notes.example.com", "", None, "2024031210010200-12345", "")),
    ("communigate", ("192.168.1.104", "", "!192.168.1.104!", "somewhere.com", "", None, "2088434", "Communigate")),
    ("mdaemon", ("202.83.84.95", "", "acecomms", "mailscan.acenet.net.au", "", None, "", "")),
    ("mailgate", ("192.0.2.1", "mail.sender.test", "client.sender.test", "mx.gateway.test", "", None, "4F2A9C1B7D",
                  "")),
    ("mailgate_no_rdns", ("192.0.2.1", "", "client.sender.test", "mx.gateway.test", "", None, "4F2A9C1B7E", "")),
])
def test_each_format_gives_its_fields(name, expected):
    assert _fields(_one(name)) == expected


def test_rdns_lookups_are_told_apart_from_mtas_that_record_none():
    # Postfix and Sendmail look names up: an empty rDNS means the host has none
    assert _one("postfix_unknown").no_reverse_dns and _one("sendmail_no_rdns").no_reverse_dns
    # Exchange and Domino never record one
    assert _one("exchange_smtpsvc").rdns_not_in_headers and not _one("exchange_smtpsvc").no_reverse_dns
    assert _one("domino").rdns_not_in_headers


@pytest.mark.parametrize("name", ["postfix_local", "google_internal", "smtpsvc_pickup", "sendmail_submit",
                                  "exim_local", "qmail_invoked"])
def test_local_handovers_are_skipped(name):
    assert parse_received_line(FORMATS[name]) == SKIP


def test_fetchers_and_unparseable_headers():
    assert parse_received_line(FORMATS["fetchmail"]) == FETCHER
    assert parse_received_line(FORMATS["unparseable"]) is None


def test_qmail_scanner_envelope_sender_goes_to_the_next_hop():
    scanner = ("from 156.56.111.196 by blazing.arsecandle.org (envelope-from <gentoo-announce-return-530-rod="
               "arsecandle.org@lists.gentoo.org>, uid 502) with qmail-scanner-1.24 (clamdscan: 0.80/594. "
               "Clear:RC:0(156.56.111.196):. Processed in 0.288806 secs); 06 Feb 2005 21:11:38 -0000")
    hop = "from lists.gentoo.org (156.56.111.196) by blazing.arsecandle.org with SMTP; 06 Feb 2005 21:11:38 -0000"
    parsed = parse_all([scanner, hop])
    assert parsed[0] == SKIP
    assert parsed[1].envfrom == "gentoo-announce-return-530-rod=arsecandle.org@lists.gentoo.org"


def _msg(*received: str, extra: str = "") -> bytes:
    head = "".join(f"Received: {r}\n" for r in received)
    return (head + extra + "From: a@example.net\nTo: bob@example.org\nSubject: hi\n\nhello\n").encode()


# --- the trust walk and the pseudo-headers --------------------------------------------

def test_inferred_trust_ends_at_the_first_public_hop():
    local = "from localhost (localhost [127.0.0.1]) by mx.example.org (Postfix) with ESMTP id XA1; " \
            "Tue, 12 Mar 2024 10:01:03 +0000"
    chain = parse_message(_msg(local, FORMATS["postfix"], FORMATS["sendmail"]))
    assert [r.ip for r in chain.trusted] == ["127.0.0.1"]
    assert [r.ip for r in chain.untrusted] == ["209.85.221.54", "65.217.159.66"]
    assert chain.internal == chain.trusted and chain.external == chain.untrusted
    assert (chain.last_trusted_relay_index, chain.last_internal_relay_index) == (0, 0)
    headers = chain.pseudo_headers()
    assert headers["x-spam-relays-trusted"] == (
        b"[ ip=127.0.0.1 rdns=localhost helo=localhost by=mx.example.org ident= envfrom= intl=1 id=XA1 auth= msa=0 ]")
    assert headers["x-spam-relays-untrusted"] == (
        b"[ ip=209.85.221.54 rdns=mail-wr1-f54.google.com helo=mail-wr1-f54.google.com by=mx.example.org ident= "
        b"envfrom= intl=0 id=4G5x2Y1abcz9sR auth= msa=0 ] [ ip=65.217.159.66 rdns=host66.insuranceiq.com "
        b"helo=mail1.insuranceiq.com by=dogma.slashnull.org ident= envfrom= intl=0 id=h2F0c2x31856 auth= msa=0 ]")
    assert headers["x-spam-last-external-relay"].startswith(b"[ ip=209.85.221.54 ")


def test_an_authenticated_hop_extends_trust():
    chain = parse_message(_msg(FORMATS["postfix_auth"], FORMATS["sendmail"]))
    assert [r.ip for r in chain.trusted] == ["203.0.113.45"] and chain.trusted[0].auth == "ESMTPSA"


def test_a_fetcher_restarts_the_trusted_part():
    local = "from localhost (localhost [127.0.0.1]) by mx.example.org (Postfix) with ESMTP id XA1; " \
            "Tue, 12 Mar 2024 10:01:03 +0000"
    chain = parse_message(_msg(local, FORMATS["fetchmail"], FORMATS["sendmail"]))
    assert chain.trusted == [] and [r.ip for r in chain.untrusted] == ["65.217.159.66"]
    assert chain.last_trusted_relay_index == 1  # the headers above it are still trusted ones


def test_configured_networks_trusted_internal_and_msa():
    mx2 = "from mx2.example.org (mx2.example.org [198.51.100.2]) by mx.example.org (Postfix) with ESMTP id MX2; " \
          "Tue, 12 Mar 2024 10:01:03 +0000"
    raw = _msg(mx2, FORMATS["postfix"], FORMATS["sendmail"])
    # a second MX we trust but do not run: trusted, external
    chain = parse_message(raw, TrustConfig.from_lists(trusted=["198.51.100.0/24"], internal=["10.0.0.0/8"]))
    assert [r.ip for r in chain.trusted] == ["198.51.100.2"] and chain.internal == []
    assert [r.ip for r in chain.untrusted] == ["209.85.221.54", "65.217.159.66"]
    assert chain.trusted[0].as_string().endswith("intl=0 id=MX2 auth= msa=0 ]")
    # trusted only: internal is the same set (SpamAssassin 2.60 compatibility)
    both = parse_message(raw, TrustConfig.from_lists(trusted=["198.51.100.2"]))
    assert [r.ip for r in both.internal] == ["198.51.100.2"]
    # an MSA: everything after it is trusted too
    msa = parse_message(raw, TrustConfig.from_lists(trusted=["198.51.100.0/24"], msa=["198.51.100.2"]))
    assert [r.ip for r in msa.trusted] == ["198.51.100.2", "209.85.221.54", "65.217.159.66"]
    assert msa.trusted[0].msa == 1 and " msa=1 ]" in msa.trusted[0].as_string()
    # configured: a private address is no longer trusted by itself
    private = parse_message(_msg(FORMATS["exchange_mapi"]), TrustConfig.from_lists(trusted=["198.51.100.0/24"]))
    assert private.trusted == [] and [r.ip for r in private.untrusted] == ["fe80::19bd:c588:dd17:5226"]
    # but an authenticated one still is
    authed = parse_message(_msg(FORMATS["communigate"]), TrustConfig.from_lists(trusted=["198.51.100.0/24"]))
    assert [r.auth for r in authed.trusted] == ["Communigate"]


def test_networks_syntax():
    nets = Networks(["192.168.", "10.0.1/24", "!10.0.1.5", "2001:db8::/32"])
    assert nets.contains("192.168.4.4") and nets.contains("10.0.1.9") and not nets.contains("10.0.1.5")
    assert nets.contains("127.0.0.1") and nets.contains("::1") and nets.contains("2001:db8::7")
    assert not nets.contains("10.0.2.1") and not nets.contains("not an address")
    assert nets.contains("::ffff:192.168.0.1")
    with pytest.raises(ValueError, match="not an IP address"):
        parse_network("mail.example.org")


def test_unparseable_headers_are_counted():
    chain = parse_message(_msg(FORMATS["unparseable"], FORMATS["sendmail"]))
    assert chain.unparseable == 1 and len(chain.untrusted) == 1


def test_originating_ip_headers_become_the_oldest_hop():
    raw = _msg(FORMATS["postfix"], extra="X-Originating-IP: [198.51.100.3]\n")
    hops = received_headers(raw, ["X-Originating-IP"])
    assert hops[-1] == "from X-Originating-IP: 198.51.100.3\n"
    chain = parse_message(raw, originating_headers=["X-Originating-IP"])
    assert chain.untrusted[-1].as_string() == (
        "[ ip=198.51.100.3 rdns= helo= by= ident= envfrom= intl=0 id= auth= msa=0 ]")


# --- RelayEval on the chain -------------------------------------------------------------

def _eval(raw: bytes, name: str, *args) -> int:
    return int(run(EvalContext(MessageView(raw)), (name, tuple(args))))


def test_all_trusted_and_no_relays():
    local = "from localhost (localhost [127.0.0.1]) by mx.example.org (Postfix) with ESMTP id XA1; " \
            "Tue, 12 Mar 2024 10:01:03 +0000"
    assert _eval(_msg(local), "check_all_trusted") == 1
    assert _eval(_msg(local, FORMATS["postfix"]), "check_all_trusted") == 0
    assert _eval(_msg(local, FORMATS["unparseable"]), "check_all_trusted") == 0
    assert _eval(_msg(local, FORMATS["unparseable"]), "check_relays_unparseable") == 1
    assert _eval(_msg(), "check_no_relays") == 1 and _eval(_msg(local), "check_no_relays") == 0


def test_forged_received_trail():
    # each hop claims to have been received by a host the next newer hop did not come from
    hop1 = "from relay.one.example (relay.one.example [198.51.100.1]) by mx.example.org (8.12.6/8.12.6) " \
           "with ESMTP id A1; Tue, 12 Mar 2024 10:01:03 +0000"
    hop2 = "from relay.two.example (relay.two.example [198.51.100.2]) by gateway.forged.test (8.12.6/8.12.6) " \
           "with ESMTP id A2; Tue, 12 Mar 2024 10:01:02 +0000"
    hop3 = "from client.three.example (client.three.example [198.51.100.3]) by other.forged.test (8.12.6/8.12.6) " \
           "with ESMTP id A3; Tue, 12 Mar 2024 10:01:01 +0000"
    assert _eval(_msg(hop1, hop2, hop3), "check_for_forged_received_trail") == 1
    assert _eval(_msg(hop1, hop2), "check_for_forged_received_trail") == 0  # one mismatch is not a trail
    # a consistent trail: each "by" is the newer hop's rDNS domain
    ok2 = hop2.replace("by gateway.forged.test", "by mail.one.example")
    ok3 = hop3.replace("by other.forged.test", "by mail.two.example")
    assert _eval(_msg(hop1, ok2, ok3), "check_for_forged_received_trail") == 0
    ip_helo = "from 203.0.113.77 (relay.one.example [198.51.100.1]) by mx.example.org (8.12.6/8.12.6) " \
              "with ESMTP id A1; Tue, 12 Mar 2024 10:01:03 +0000"
    assert _eval(_msg(ip_helo), "check_for_forged_received_ip_helo") == 1
    assert _eval(_msg(ip_helo), "helo_ip_mismatch") == 1
    assert _eval(_msg(ip_helo), "check_for_numeric_helo") == 1
    assert _eval(_msg(hop1), "check_for_forged_received_ip_helo") == 0


def test_dotcom_helo_without_rdns_and_sender_no_reverse():
    dotcom = "from mx.hotmail.com ([198.51.100.9]) by mx.example.org (8.12.6/8.12.6) with ESMTP id A1; " \
             "Tue, 12 Mar 2024 10:01:03 +0000"
    assert _eval(_msg(dotcom), "check_for_no_rdns_dotcom_helo") == 1
    assert _eval(_msg(FORMATS["sendmail"]), "check_for_no_rdns_dotcom_helo") == 0
    assert _eval(_msg(FORMATS["sendmail"]), "check_for_sender_no_reverse") == 1
    assert _eval(_msg(dotcom), "check_for_sender_no_reverse") == 0


# --- against SpamAssassin itself ------------------------------------------------------------

_SA_SCRIPT = r"""
use strict; use warnings;
use Mail::SpamAssassin; use Mail::SpamAssassin::PerMsgStatus;
my $sa = Mail::SpamAssassin->new({config_text => $ENV{SA_CONFIG}, local_tests_only => 1, dont_copy_prefs => 1,
                                  userprefs_filename => '/dev/null'});
$sa->init(0);
while (my $path = <STDIN>) {
  chomp $path; open(my $fh, '<', $path) or die "$path: $!"; local $/; my $text = <$fh>; close $fh;
  my $msg = $sa->parse($text, 1); my $pms = Mail::SpamAssassin::PerMsgStatus->new($sa, $msg);
  $pms->extract_message_metadata();
  print join("\t", $path, map { $pms->{$_} // '' } qw(relays_trusted_str relays_untrusted_str relays_internal_str
     relays_external_str num_relays_unparseable last_trusted_relay_index last_internal_relay_index)), "\n";
  $pms->finish; $msg->finish;
}
"""


def _chains() -> dict[str, bytes]:
    local = "from localhost (localhost [127.0.0.1]) by mx.example.org (Postfix) with ESMTP id XA1; " \
            "Tue, 12 Mar 2024 10:01:03 +0000"
    out = {f"single_{n}": _msg(h) for n, h in FORMATS.items()}
    out["fetched"] = _msg(local, FORMATS["fetchmail"], FORMATS["exim3"], FORMATS["qmail_helo"])
    out["exchange_org"] = _msg(FORMATS["postfix"], FORMATS["exchange_mapi"], FORMATS["exchange_online"],
                               FORMATS["exchange_smtpsvc"])
    out["submission"] = _msg(FORMATS["postfix"], FORMATS["postfix_auth"], FORMATS["communigate"])
    out["mixed"] = _msg(FORMATS["mailgate"], FORMATS["exim4"], FORMATS["sendmail_ident"], FORMATS["unparseable"],
                        FORMATS["qmail_ident"], FORMATS["mdaemon"], extra="X-Originating-IP: [198.51.100.3]\n")
    out["crlf"] = _msg(FORMATS["mailgate_no_rdns"], FORMATS["domino"]).replace(b"\n", b"\r\n")
    return out


@pytest.mark.parametrize("config, trust", [
    ("", TrustConfig()),
    ("trusted_networks 209.85.221.0/24 203.0.113.45\ninternal_networks 209.85.221.54\nmsa_networks 203.0.113.45\n",
     TrustConfig.from_lists(["209.85.221.0/24", "203.0.113.45"], ["209.85.221.54"], ["203.0.113.45"])),
])
def test_same_relays_as_spamassassin(tmp_path, config, trust):
    require_program("spamassassin")  # its Perl modules are what we run
    paths = {}
    for name, raw in _chains().items():
        p = tmp_path / f"{name}.eml"
        p.write_bytes(raw)
        paths[str(p)] = raw
    env = {"SA_CONFIG": "originating_ip_headers X-Originating-IP\n" + config, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["perl", "-e", _SA_SCRIPT], input="\n".join(paths) + "\n", capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert len(rows) == len(paths)
    for path, *want in rows:
        c = parse_message(paths[path], trust, ["X-Originating-IP"])
        got = [" ".join(r.as_string() for r in rs) for rs in (c.trusted, c.untrusted, c.internal, c.external)]
        got += [str(c.unparseable), str(c.last_trusted_relay_index), str(c.last_internal_relay_index)]
        assert got == want, path


def test_walk_puts_a_known_hop_first():
    ours = Relay(ip="192.0.2.1", rdns="mail.sender.test", helo="mail.sender.test", by="mx.gateway.test", id="Q1",
                 index=0)
    chain = walk(parse_all([FORMATS["sendmail"]], start=1), first=ours)
    assert [r.ip for r in chain.untrusted] == ["192.0.2.1", "65.217.159.66"]
    assert [r.index for r in chain.untrusted] == [0, 1]


@pytest.mark.parametrize("line", [
    "from a by b; Tue, 12 Mar 2024 10:01:02 +0000", "from a by b;Tue, 12 Mar 2024 10:01:02 +0000",
    "from a by b id X;12 Mar 2024 10:01 -0000", "from a by b ; ; Sat, 1 Nov 2003 07:05:19 GMT",
    "from a by b xSat, 1 Nov 2003 07:05:19 GMT", "from a by b; 12 Mar 2024 10:01:02 +0000 (UTC)",
    "from a by b; 12 mar 2024 10:01:02 +0000", "from a by b; 12 Mar 24 1:2 Z", "12 Mar 2024 10:01:02 +0000",
    " 12 Mar 2024 10:01:02 +0000", "from a by b; Sat, 12 Mar 2024 10:01:02", "from a by b;  12 Mar 2024 10:01 x",
])
def test_date_removal_is_the_perl_substitution(line):
    from rules.sa.received import _DATE, _strip_date

    m = _DATE.search(line)
    assert _strip_date(line) == (line[:m.start()] if m else line)
