#!/usr/bin/env bash
# Certificates for the TLS tests, made with openssl in a folder of their own:
#   ca.pem                          the test CA that servers and clients trust
#   server.pem, server.key          signed by it, for localhost and 127.0.0.1
#   client.pem, client.key          signed by it, for clients that must show one
#   untrusted-ca.pem                another CA, that signed nothing the servers show
#   untrusted.pem, untrusted.key    a server certificate for localhost signed by untrusted-ca
#
#   scripts/make-certs.sh DIR      (DIR is created; files in it are replaced)
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
days=30
quiet() { "$@" >/dev/null 2>&1 || { echo "make-certs: failed: $*" >&2; exit 1; }; }

ca() {  # name, common name
    quiet openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=$2" \
        -keyout "$1.key" -out "$1.pem"
}
signed() {  # name, CA name, extensions
    quiet openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$1.key" -out "$1.csr"
    printf '%s\n' "$3" >"$1.ext"
    quiet openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
        -days "$days" -extfile "$1.ext" -out "$1.pem"
    rm -f "$1.csr" "$1.ext"
}

server_ext="subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
ca ca "guillotina_amqp test CA"
ca untrusted-ca "an untrusted CA"
signed server ca "$server_ext"
signed client ca "extendedKeyUsage=clientAuth"
signed untrusted untrusted-ca "$server_ext"
# the servers may run as other users (rabbitmq-server drops to `rabbitmq`): readable keys
chmod 644 ./*.key ./*.pem
