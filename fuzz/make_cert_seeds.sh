#!/usr/bin/env bash
# Writes client certificates for peer_identity_fuzz into DIR, as PEM and as DER: a usable one
# of each principal kind and one for each way ParsePeerCertificate refuses a certificate. Made
# fresh at every run from throwaway keys (public test data; nothing here is kept or trusted).
# Usage: fuzz/make_cert_seeds.sh DIR
set -euo pipefail
out="${1:?usage: make_cert_seeds.sh DIR}"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca.key" 2>/dev/null
openssl req -x509 -new -key "$work/ca.key" -subj "/CN=Custos Fuzz CA" -days 30 \
  -addext "basicConstraints=critical,CA:TRUE" -out "$work/ca.pem" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$work/leaf.key" 2>/dev/null

# cert NAME SUBJECT EXTENSIONS...: a certificate for the leaf key, signed by the CA.
serial=1
cert() {
  local name="$1" subject="$2"
  shift 2
  printf '%s\n' "$@" >"$work/$name.ext"
  openssl req -new -key "$work/leaf.key" -subj "$subject" -out "$work/$name.csr" 2>/dev/null
  openssl x509 -req -in "$work/$name.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -set_serial "$serial" -days 30 -extfile "$work/$name.ext" -out "$out/$name.pem" 2>/dev/null
  openssl x509 -in "$out/$name.pem" -outform DER -out "$out/$name.der"
  serial=$((serial + 1))
}

cert uri_san "/CN=ignored" "extendedKeyUsage=clientAuth" \
  "subjectAltName=URI:spiffe://custos.local/app/demo"
cert cn_only "/O=Custos/CN=officer1" "extendedKeyUsage=clientAuth,serverAuth"
cert two_uris "/CN=x" "extendedKeyUsage=clientAuth" \
  "subjectAltName=URI:spiffe://custos.local/a,URI:spiffe://custos.local/b"
cert uri_no_scheme "/CN=x" "extendedKeyUsage=clientAuth" "subjectAltName=URI:officer1"
cert no_eku "/CN=app1" "keyUsage=digitalSignature"
cert server_only "/CN=app1" "extendedKeyUsage=serverAuth"
cert cn_with_colon "/CN=urn:custos:officer" "extendedKeyUsage=clientAuth"
cert two_cns "/CN=a/CN=b" "extendedKeyUsage=clientAuth"
cert dns_and_email "/CN=app2" "extendedKeyUsage=clientAuth" \
  "subjectAltName=DNS:app2.custos.local,email:app2@custos.local"
cp "$work/ca.pem" "$out/ca.pem"
