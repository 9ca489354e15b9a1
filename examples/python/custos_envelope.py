#!/usr/bin/python3
"""Encrypt files with data keys from Custos (envelope encryption), from Python.

    custos_envelope.py [connection] encrypt --key emr-files --in scan.pdf --out scan.pdf.custos
    custos_envelope.py [connection] decrypt --in scan.pdf.custos --out scan.pdf

encrypt asks Custos for a fresh AES-256 data key (KeyService.GenerateDataKey), encrypts the
file here with AES-256-GCM, and keeps only the wrapped data key, beside the ciphertext. decrypt
asks Custos to unwrap it (KeyService.Decrypt), which only an app granted decryption on that key
can, and every call is in Custos's audit log. The data key is bound to an encryption context
({"file": <the original file name>}): Custos refuses to unwrap it under any other context.

The envelope file is:
    b"CUSTOS-ENVELOPE-1\\n"
    one line of JSON: {"key_id", "key_version", "context", "wrapped_key" (base64),
                       "nonce" (base64, 12 bytes)}, then b"\\n"
    the AES-256-GCM ciphertext of the file, with its 16-byte tag at the end
The GCM associated data is everything before the ciphertext, so a changed header (another
wrapped key, another context) fails decryption as surely as a changed ciphertext.

Connection: --addr HOST:PORT --ca CA.pem --cert CLIENT.pem --key CLIENT.key (or CUSTOS_ADDR,
CUSTOS_CA, CUSTOS_CERT, CUSTOS_KEY), mutual TLS as for every Custos client. The generated gRPC
modules (custos/v1/*_pb2*.py, made at build time from proto/) are found through --stubs or
CUSTOS_PY_STUBS.

Needs Debian's python3-grpcio, python3-protobuf and python3-cryptography (/usr/bin/python3).
Exit status: 0 done, 2 Custos refused or could not be reached, 3 the envelope does not decrypt
(changed, or not an envelope), 4 bad arguments or files.
"""
import argparse
import base64
import json
import os
import sys
import tempfile

MAGIC = b"CUSTOS-ENVELOPE-1\n"
NONCE_BYTES = 12


class Failure(Exception):
    """An error to report in one line, with the exit status to leave with."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def connect(args):
    import grpc
    from custos.v1 import key_service_pb2_grpc

    def read(path, what):
        if not path:
            raise Failure(f"give --{what} (or CUSTOS_{what.upper()})", 4)
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca, "ca"),
        private_key=read(args.key, "key"),
        certificate_chain=read(args.cert, "cert"))
    channel = grpc.secure_channel(args.addr, credentials)
    return key_service_pb2_grpc.KeyServiceStub(channel)


def wipe(buffer):
    # Python cannot promise that no other copy of the key exists (the gRPC reply and the
    # cryptography library hold their own): this clears the one this program keeps.
    for i in range(len(buffer)):
        buffer[i] = 0


def write_atomically(path, chunks):
    """Writes `chunks` to `path` through a temporary file in the same folder, so that a reader
    never sees half a file and a failure leaves no file at all."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".custos-")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def encrypt(args, keys):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from custos.v1 import key_service_pb2

    context = {"file": os.path.basename(args.input)}
    reply = keys.GenerateDataKey(key_service_pb2.GenerateDataKeyRequest(
        key=args.key_id, encryption_context=context, key_spec=key_service_pb2.AES_256),
        timeout=args.timeout)
    data_key = bytearray(reply.plaintext)
    try:
        nonce = os.urandom(NONCE_BYTES)
        header = MAGIC + json.dumps({
            "key_id": reply.key_id,
            "key_version": reply.key_version,
            "context": context,
            "wrapped_key": base64.b64encode(reply.ciphertext_blob).decode(),
            "nonce": base64.b64encode(nonce).decode(),
        }, sort_keys=True).encode() + b"\n"
        with open(args.input, "rb") as f:
            plaintext = f.read()
        ciphertext = AESGCM(bytes(data_key)).encrypt(nonce, plaintext, header)
    finally:
        wipe(data_key)
    write_atomically(args.output, [header, ciphertext])


def decrypt(args, keys):
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from custos.v1 import key_service_pb2

    with open(args.input, "rb") as f:
        envelope = f.read()
    line_end = envelope.find(b"\n", len(MAGIC))
    if not envelope.startswith(MAGIC) or line_end < 0:
        raise Failure(f"{args.input} is not a Custos envelope", 3)
    header = envelope[:line_end + 1]
    try:
        fields = json.loads(header[len(MAGIC):])
        wrapped_key = base64.b64decode(fields["wrapped_key"], validate=True)
        nonce = base64.b64decode(fields["nonce"], validate=True)
        context = fields["context"]
    except (ValueError, KeyError, TypeError) as e:
        raise Failure(f"{args.input}: malformed envelope header ({e})", 3) from None
    reply = keys.Decrypt(key_service_pb2.DecryptRequest(
        ciphertext_blob=wrapped_key, encryption_context=context), timeout=args.timeout)
    data_key = bytearray(reply.plaintext)
    try:
        plaintext = AESGCM(bytes(data_key)).decrypt(nonce, envelope[line_end + 1:], header)
    except (InvalidTag, ValueError):
        raise Failure(f"{args.input} does not decrypt: it was changed, or damaged", 3) from None
    finally:
        wipe(data_key)
    write_atomically(args.output, [plaintext])


def main(argv):
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default=env("CUSTOS_ADDR", "127.0.0.1:7443"))
    parser.add_argument("--ca", default=env("CUSTOS_CA"))
    parser.add_argument("--cert", default=env("CUSTOS_CERT"))
    parser.add_argument("--key", default=env("CUSTOS_KEY"))
    parser.add_argument("--stubs", default=env("CUSTOS_PY_STUBS"),
                        help="folder of the generated custos/v1 Python modules")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    commands = parser.add_subparsers(dest="command", required=True)
    sealing = commands.add_parser("encrypt", help="encrypt a file under a new data key")
    sealing.add_argument("--key-id", required=True, help="the Custos key (id or alias)")
    sealing.add_argument("--in", dest="input", required=True)
    sealing.add_argument("--out", dest="output", required=True)
    opening = commands.add_parser("decrypt", help="decrypt an envelope file")
    opening.add_argument("--in", dest="input", required=True)
    opening.add_argument("--out", dest="output", required=True)
    args = parser.parse_args(argv)
    if args.stubs:
        sys.path.insert(0, args.stubs)

    import grpc
    try:
        keys = connect(args)
        (encrypt if args.command == "encrypt" else decrypt)(args, keys)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
