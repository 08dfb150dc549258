#!/bin/sh
# Installs the Debian packages the test suite starts for real.  Idempotent:
# when every program is already there it does nothing.  Needs root to install;
# without root it only reports what is missing (and CI, which runs as root,
# installs it).
set -eu
PKGS="clamav-daemon clamav clamdscan rbldnsd dnsmasq-base nsd swaks
libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl postfix
c-icap libc-icap-mod-virus-scan slapd ldap-utils openssl xxd spamassassin spamd spamc
redis-server postgresql chromium chromium-driver"
# program -> package: a missing program means its package must be installed
NEED=""
for pair in clamd:clamav-daemon clamscan:clamav clamdscan:clamdscan rbldnsd:rbldnsd \
            dnsmasq:dnsmasq-base nsd:nsd swaks:swaks smtp-sink:postfix smtp-source:postfix \
            c-icap:c-icap slapd:slapd ldapadd:ldap-utils xxd:xxd \
            spamassassin:spamassassin spamd:spamd spamc:spamc \
            redis-server:redis-server redis-cli:redis-tools \
            chromium:chromium chromedriver:chromium-driver; do
  prog=${pair%%:*}
  if ! command -v "$prog" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$prog" ]; then NEED="$NEED ${pair#*:}"; fi
done
[ -f /usr/lib/x86_64-linux-gnu/c_icap/virus_scan.so ] || [ -n "$(ls /usr/lib/*/c_icap/virus_scan.so 2>/dev/null)" ] || NEED="$NEED libc-icap-mod-virus-scan"
# the tracking store's PostgreSQL tests: the server binaries are not on PATH
[ -n "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || NEED="$NEED postgresql"
[ -z "$NEED" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages:$NEED (run make test as root to install them)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# postfix: only its smtp-sink/smtp-source binaries are used; "No configuration"
# keeps the system MTA from ever starting on port 25
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
apt-get update -q >/dev/null
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $PKGS >/dev/null
# where package scripts started services, stop them: tests start their own
for s in clamav-daemon clamav-freshclam rbldnsd nsd redis-server c-icap slapd postfix postgresql; do
  service "$s" stop >/dev/null 2>&1 || true
done
