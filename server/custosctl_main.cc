// custosctl: a command-line client for Custos, authenticated by a client certificate.
//
// Replies print as JSON (bytes fields in base64). Connection settings come from flags, from
// CUSTOS_ADDR / CUSTOS_CA / CUSTOS_CERT / CUSTOS_KEY, or from --state DIR --as NAME, which
// picks DIR/pki/ca.crt and DIR/pki/clients/NAME.{crt,key} as made by tools/make-state.sh.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <openssl/evp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <toml++/toml.h>
#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/status/status.h"
#include "audit/record.h"
#include "audit/verifier.h"
#include "custos/v1/admin_service.grpc.pb.h"
#include "custos/v1/audit_service.grpc.pb.h"
#include "custos/v1/database_service.grpc.pb.h"
#include "custos/v1/key_service.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/audit_proto.h"
#include "storage/audit_log_reader.h"
#include "storage/backup.h"

namespace {

namespace pb = custos::v1;
namespace audit = custos::audit;
namespace storage = custos::storage;
using custos::Bytes;

struct Connection {
  std::string addr;  // empty: the state folder's listen address, else 127.0.0.1:7443
  std::string ca, cert, key, state, as;

  void FromEnvironment() {
    for (auto [name, field] : {std::pair{"CUSTOS_ADDR", &addr}, std::pair{"CUSTOS_CA", &ca},
                               std::pair{"CUSTOS_CERT", &cert}, std::pair{"CUSTOS_KEY", &key}}) {
      if (const char* v = std::getenv(name); v != nullptr && *v != '\0') *field = v;
    }
  }
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CLI::ValidationError("cannot read " + path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Where the server of state folder `state` listens: [server] listen in its custosd.toml, with
// a wildcard host dialled on this machine.
std::string AddressFromState(const std::string& state) {
  const std::string path = state + "/custosd.toml";
  toml::table config;
  try {
    config = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    throw CLI::ValidationError("cannot read " + path + ": " + std::string(e.description()));
  }
  const std::string listen = config["server"]["listen"].value_or(std::string("127.0.0.1:7443"));
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) throw CLI::ValidationError(path + ": listen has no port");
  std::string host = listen.substr(0, colon);
  const std::string port = listen.substr(colon + 1);
  if (port == "0") {
    throw CLI::ValidationError(path + " listens on a port chosen at start-up; give --addr");
  }
  if (host.empty() || host == "0.0.0.0" || host == "[::]") host = "localhost";
  return host + ":" + port;
}

std::shared_ptr<grpc::Channel> Connect(Connection c) {
  if (c.addr.empty()) c.addr = c.state.empty() ? "127.0.0.1:7443" : AddressFromState(c.state);
  if (!c.state.empty()) {
    if (c.as.empty()) throw CLI::ValidationError("--state needs --as NAME");
    c.ca = c.state + "/pki/ca.crt";
    c.cert = c.state + "/pki/clients/" + c.as + ".crt";
    c.key = c.state + "/pki/clients/" + c.as + ".key";
  }
  if (c.ca.empty() || c.cert.empty() || c.key.empty()) {
    throw CLI::ValidationError("give --ca, --cert and --key (or --state DIR --as NAME)");
  }
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = ReadFile(c.ca);
  tls.pem_cert_chain = ReadFile(c.cert);
  tls.pem_private_key = ReadFile(c.key);
  return grpc::CreateChannel(c.addr, grpc::SslCredentials(tls));
}

// Writes `contents` to `path`, or throws naming the file: an auditor must never believe an
// anchor was saved when it was not.
void WriteFileOrThrow(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
}

// Writes the checkpoint's files for `openssl dgst -sha256 -verify` and for --anchor into
// `dir`, created (0700) if missing.
void WriteCheckpointFiles(const std::string& dir, const pb::Checkpoint& reply) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) throw std::runtime_error("cannot create " + dir + ": " + error.message());
  WriteFileOrThrow(dir + "/checkpoint.msg", reply.message());
  WriteFileOrThrow(dir + "/checkpoint.sig", reply.signature());
  WriteFileOrThrow(dir + "/audit-public.pem", reply.public_key_pem());
  WriteFileOrThrow(dir + "/checkpoint.json",
                   audit::CheckpointToJson(custos::server::FromProto(reply)));
}

// NAME=VALUE pairs as a map; a name given twice is refused (which value was meant?). Errors
// name `flags` and the pair's name only: a context's value may be what the caller keeps out of
// view.
std::map<std::string, std::string> ParsePairs(const std::vector<std::string>& pairs,
                                              const std::string& flags) {
  std::map<std::string, std::string> out;
  for (const std::string& p : pairs) {
    const size_t eq = p.find('=');
    if (eq == std::string::npos) {
      throw CLI::ValidationError(flags + ": expected NAME=VALUE, got a pair with no '='");
    }
    if (!out.emplace(p.substr(0, eq), p.substr(eq + 1)).second) {
      throw CLI::ValidationError(flags + ": '" + p.substr(0, eq) + "' is given twice");
    }
  }
  return out;
}

std::string Base64Decode(const std::string& text) {
  if (text.size() % 4 != 0) throw CLI::ValidationError("--blob is not valid base64");
  std::string out(text.size() / 4 * 3, '\0');
  const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(text.data()),
                                static_cast<int>(text.size()));
  if (n < 0) throw CLI::ValidationError("--blob is not valid base64");
  // EVP_DecodeBlock counts '=' padding as zero bytes; drop them.
  size_t padding = 0;
  for (size_t i = text.size(); i > 0 && padding < 2 && text[i - 1] == '='; --i) ++padding;
  out.resize(static_cast<size_t>(n) - padding);
  return out;
}

std::string StatusName(grpc::StatusCode code) {
  // absl and gRPC share their code numbers.
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "UNKNOWN" : name;
}

// Protobuf's JSON writes 64-bit integers as strings (JavaScript's numbers stop at 2^53);
// custosctl writes counts as JSON numbers, which every JSON tool reads exactly this far.
void CountsAsNumbers(const google::protobuf::Descriptor& type, nlohmann::ordered_json& json) {
  using google::protobuf::FieldDescriptor;
  for (int i = 0; i < type.field_count(); ++i) {
    const FieldDescriptor& field = *type.field(i);
    const auto found = json.find(field.name());
    if (found == json.end() || field.is_map()) continue;
    const auto convert = [&field](nlohmann::ordered_json& value) {
      if (field.cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
        CountsAsNumbers(*field.message_type(), value);
      } else if (value.is_string() && field.cpp_type() == FieldDescriptor::CPPTYPE_INT64) {
        value = std::stoll(value.get<std::string>());
      } else if (value.is_string() && field.cpp_type() == FieldDescriptor::CPPTYPE_UINT64) {
        value = std::stoull(value.get<std::string>());
      }
    };
    if (field.is_repeated()) {
      for (nlohmann::ordered_json& element : *found) convert(element);
    } else {
      convert(*found);
    }
  }
}

// A reply as JSON (times in RFC 3339, bytes in base64, counts as numbers), or the error.
int Print(const grpc::Status& status, const google::protobuf::Message& reply) {
  if (!status.ok()) {
    std::cerr << "error: " << StatusName(status.error_code()) << ": " << status.error_message()
              << "\n";
    return 2;
  }
  std::string text;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(reply, &text, options);
  nlohmann::ordered_json json = nlohmann::ordered_json::parse(text);
  CountsAsNumbers(*reply.GetDescriptor(), json);
  std::cout << json.dump(1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
  return 0;
}

// Verifies a log offline, from exports or archives and/or the database file itself (whose
// stored checkpoints are then checked too), all of them as one log in the order given; exit 0
// if it verifies, 3 if not (the report names the first bad record), 2 on bad input.
int VerifyLog(const std::vector<std::string>& files, const std::string& db_file,
              const std::string& anchor_file, const std::string& public_key_file) {
  absl::StatusOr<audit::PublicKeyVerifier> key =
      audit::PublicKeyVerifier::FromPem(ReadFile(public_key_file));
  if (!key.ok()) {
    std::cerr << "error: " << key.status().ToString() << "\n";
    return 2;
  }
  std::optional<audit::Checkpoint> anchor;
  if (!anchor_file.empty()) {
    absl::StatusOr<audit::Checkpoint> parsed = audit::CheckpointFromJson(ReadFile(anchor_file));
    if (!parsed.ok()) {
      std::cerr << "error: " << parsed.status().ToString() << "\n";
      return 2;
    }
    anchor = *std::move(parsed);
  }
  const audit::Checkpoint* anchor_ptr = anchor ? &*anchor : nullptr;
  // Every source's checkpoints, each once: an archive ends with the checkpoint the next one
  // (or the live log) starts from, and both hold it.
  std::map<uint64_t, audit::Checkpoint> checkpoints;
  const auto add = [&](absl::StatusOr<std::vector<audit::Checkpoint>> found,
                       const std::string& from) {
    if (!found.ok()) {
      std::cerr << "error: " << from << ": " << found.status().ToString() << "\n";
      return false;
    }
    for (audit::Checkpoint& checkpoint : *found) {
      auto [it, added] = checkpoints.emplace(checkpoint.seq, checkpoint);
      if (!added && audit::CheckpointMessage(it->second) != audit::CheckpointMessage(checkpoint)) {
        std::cerr << "error: " << from << " holds a checkpoint at " << checkpoint.seq
                  << " that differs from another file's\n";
        return false;
      }
    }
    return true;
  };
  std::vector<std::unique_ptr<std::ifstream>> streams;
  std::vector<std::unique_ptr<audit::RecordSource>> owned;
  std::vector<audit::RecordSource*> sources;
  for (const std::string& file : files) {
    // Two passes: the file's checkpoints first, then the records they are checked against.
    std::ifstream checkpoint_lines(file);
    if (!checkpoint_lines) throw CLI::ValidationError("cannot read " + file);
    if (!add(audit::ReadCheckpointLines(checkpoint_lines), file)) return 2;
    auto& in = streams.emplace_back(std::make_unique<std::ifstream>(file));
    if (!*in) throw CLI::ValidationError("cannot read " + file);
    sources.push_back(
        owned.emplace_back(std::make_unique<audit::JsonLinesRecordSource>(in.get())).get());
  }
  if (!db_file.empty()) {
    absl::StatusOr<std::unique_ptr<storage::AuditLogReader>> reader =
        storage::AuditLogReader::Open(db_file);
    if (!add(reader.ok() ? (*reader)->Checkpoints() : reader.status(), db_file)) return 2;
    sources.push_back(owned.emplace_back(*std::move(reader)).get());
  }
  std::vector<audit::Checkpoint> all;
  all.reserve(checkpoints.size());
  for (auto& [seq, checkpoint] : checkpoints) all.push_back(std::move(checkpoint));
  audit::ConcatenatedRecordSource records(sources);
  const audit::VerifyReport report = audit::Verify(records, all, anchor_ptr, *key);
  std::cout << report.Summary() << "\n";
  return report.ok ? 0 : 3;
}

// grpc.health.v1 Check, for a container's or balancer's health check: exit 0 and print the
// status if SERVING; exit 1 (what container engines take for unhealthy) for any other status,
// for no answer within `timeout_seconds` and for any error, which goes to stderr.
int CheckHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                double timeout_seconds) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse reply;
  const grpc::Status status =
      grpc::health::v1::Health::NewStub(channel)->Check(&context, request, &reply);
  if (!status.ok()) {
    Print(status, reply);
    return 1;
  }
  std::cout << "{\"status\": \""
            << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(reply.status()) << "\"}\n";
  return reply.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

// custosctl backup: an online copy of the key database, and what the copy needs from the HSM
// token to be of use (docs/OPERATIONS.md); exit 0 and a JSON summary, or 2 and the error.
int BackupDatabase(const std::string& db_file, const std::string& out_file) {
  absl::StatusOr<storage::BackupSummary> summary = storage::BackupDatabase(db_file, out_file);
  if (!summary.ok()) {
    std::cerr << "error: " << summary.status().ToString() << "\n";
    return 2;
  }
  nlohmann::ordered_json json = {{"backup", out_file},
                                 {"bytes", summary->bytes},
                                 {"last_record", summary->last_record},
                                 {"last_checkpoint", summary->last_checkpoint},
                                 {"keys", summary->keys},
                                 {"versions_by_root", summary->versions_by_root}};
  std::cout << json.dump(2) << "\n";
  return 0;
}

// The bytes of `path`, or of standard input for "-"; at most `max_bytes` of them, or the
// error says what `use` takes.
std::string ReadBounded(const std::string& path, size_t max_bytes, const std::string& use) {
  std::ifstream file;
  if (path != "-") {
    if (std::filesystem::is_directory(path)) {
      throw std::runtime_error("cannot read " + path + ": it is a directory");
    }
    file.open(path, std::ios::binary);
    if (!file) throw std::runtime_error("cannot read " + path + ": " + std::strerror(errno));
  }
  std::istream& in = path == "-" ? std::cin : file;
  std::string bytes(max_bytes + 1, '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (in.bad()) throw std::runtime_error("cannot read " + path);
  if (static_cast<size_t>(in.gcount()) > max_bytes) {
    throw std::runtime_error(path + " holds more than " + std::to_string(max_bytes) +
                             " bytes, the most " + use + " takes");
  }
  bytes.resize(static_cast<size_t>(in.gcount()));
  return bytes;
}

// The NAME=VALUE lines of `path` ("-": standard input), one pair each, exactly as written
// (a line end of CR LF, a leading UTF-8 byte-order mark and blank lines aside): an encryption
// context kept out of the process list, where every user of the host sees it.
std::vector<std::string> ReadPairs(const std::string& path) {
  // What custosd takes (core::kMaxContextBytes of names and values, kMaxContextEntries pairs),
  // with an '=' and a line end per pair.
  std::string text = ReadBounded(path, 8192 + size_t{64} * 3, "a context file");
  if (text.rfind("\xEF\xBB\xBF", 0) == 0) text.erase(0, 3);
  std::vector<std::string> pairs;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) pairs.push_back(std::move(line));
  }
  return pairs;
}

std::unique_ptr<grpc::ClientContext> NewContext() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return context;
}

}  // namespace

static int Run(int argc, char** argv) {
  CLI::App app{"custosctl: command-line client for the Custos key management server"};
  app.require_subcommand(1);
  Connection conn;
  conn.FromEnvironment();
  app.add_option("--addr", conn.addr, "server address (CUSTOS_ADDR)");
  app.add_option("--ca", conn.ca, "CA certificate that signed the server (CUSTOS_CA)");
  app.add_option("--cert", conn.cert, "client certificate (CUSTOS_CERT)");
  app.add_option("--key", conn.key, "client private key (CUSTOS_KEY)");
  app.add_option("--state", conn.state, "state folder made by tools/make-state.sh");
  app.add_option("--as", conn.as, "with --state: the client name (app, officer1, ...)");

  std::string key, alias, description, blob, plaintext, destination;
  std::vector<std::string> tags, context_pairs, dest_context_pairs, encrypters, decrypters;
  // Contexts in files: added to --context's pairs (--to-context's).
  std::string context_file, dest_context_file;
  static constexpr char kContextFileHelp[] =
      "file of encryption context NAME=VALUE lines, or - for standard input (kept out of the "
      "process list, unlike --context)";
  uint32_t page_size = 0;
  std::string page_token;
  bool aes128 = false;
  uint32_t rotation_days = 0;

  CLI::App* create = app.add_subcommand("create-key", "create a key (officer)");
  create->add_option("--alias", alias, "unique alias");
  create->add_option("--description", description);
  create->add_option("--tag", tags, "NAME=VALUE, repeatable");
  create->add_option("--encrypt", encrypters, "app principal allowed to encrypt, repeatable");
  create->add_option("--decrypt", decrypters, "app principal allowed to decrypt, repeatable");
  create->add_option("--rotation-period-days", rotation_days, "rotate automatically (days)");
  CLI::App* describe = app.add_subcommand("describe-key", "show a key (officer)");
  describe->add_option("key", key, "key id or alias")->required();
  CLI::App* list = app.add_subcommand("list-keys", "list keys (officer)");
  list->add_option("--page-size", page_size);
  list->add_option("--page-token", page_token);
  for (CLI::App* sub : {app.add_subcommand("generate-data-key", "new data key (app)"),
                        app.add_subcommand("generate-data-key-without-plaintext",
                                           "new data key, blob only (app)")}) {
    sub->add_option("--key", key, "key id or alias")->required();
    sub->add_option("--context", context_pairs, "encryption context NAME=VALUE, repeatable");
    sub->add_option("--context-file", context_file, kContextFileHelp);
    sub->add_flag("--aes128", aes128, "a 16-byte data key instead of 32");
  }
  CLI::App* encrypt = app.add_subcommand("encrypt", "encrypt up to 4 KiB (app)");
  encrypt->add_option("--key", key, "key id or alias")->required();
  std::string plaintext_file;
  CLI::Option* plaintext_text = encrypt->add_option(
      "--plaintext", plaintext, "text to encrypt (other users see it in the process list)");
  CLI::Option* plaintext_from = encrypt
                                    ->add_option("--plaintext-file", plaintext_file,
                                                 "file holding up to 4 KiB to encrypt, or - "
                                                 "for standard input")
                                    ->excludes(plaintext_text);
  encrypt->add_option("--context", context_pairs, "encryption context NAME=VALUE");
  encrypt->add_option("--context-file", context_file, kContextFileHelp);
  CLI::App* decrypt = app.add_subcommand("decrypt", "decrypt a blob (app)");
  decrypt->add_option("--blob", blob, "ciphertext blob, base64")->required();
  decrypt->add_option("--context", context_pairs, "encryption context NAME=VALUE");
  decrypt->add_option("--context-file", context_file, kContextFileHelp);
  CLI::App* reencrypt = app.add_subcommand("re-encrypt", "re-encrypt a blob (app)");
  reencrypt->add_option("--blob", blob, "ciphertext blob, base64")->required();
  reencrypt->add_option("--context", context_pairs, "source encryption context NAME=VALUE");
  reencrypt->add_option("--context-file", context_file, kContextFileHelp);
  reencrypt->add_option("--to-key", destination, "destination key (default: the same key)");
  reencrypt->add_option("--to-context", dest_context_pairs, "destination context NAME=VALUE");
  reencrypt->add_option("--to-context-file", dest_context_file,
                        "destination context as --context-file reads one");

  std::string operation, justification, request_id, digest, reason, state;
  uint32_t min_decrypt_version = 0, waiting_days = 0;
  CLI::App* propose = app.add_subcommand("propose", "propose a key change (officer)");
  propose
      ->add_option("operation", operation,
                   "create-key, rotate-key, disable-key, enable-key, schedule-key-deletion, "
                   "cancel-key-deletion, update-key-grants, set-min-decrypt-version, "
                   "rotate-root-key (no --key: new key versions go under a new root, versions "
                   "under a legacy root move to it), re-anchor-audit-log (no --key: accept a "
                   "database restored from a backup; custosd started with --allow-re-anchor), "
                   "archive-audit-log (no --key; --through SEQ: records up to that signed "
                   "checkpoint move to an archive file beside the database), "
                   "create-tde-key, rotate-tde-key, issue-database-token, "
                   "revoke-database-token (the key/value gateway's; no --key but for "
                   "create-tde-key's sealing key: docs/TDE.md)")
      ->required();
  propose->add_option("--key", key,
                      "key id or alias: the key the operation changes (none for create-key, "
                      "rotate-root-key, re-anchor-audit-log, archive-audit-log and the "
                      "gateway's operations), or create-tde-key's sealing key");
  propose->add_option("--justification", justification, "why, for the approvers")->required();
  propose->add_option("--alias", alias, "create-key: alias");
  propose->add_option("--description", description, "create-key: description");
  propose->add_option("--tag", tags, "create-key: NAME=VALUE, repeatable");
  propose->add_option("--rotation-period-days", rotation_days, "create-key: rotate every N days");
  propose->add_option("--encrypt", encrypters,
                      "create-key, update-key-grants: app allowed to encrypt, repeatable");
  propose->add_option("--decrypt", decrypters,
                      "create-key, update-key-grants: app allowed to decrypt, repeatable");
  propose->add_option("--min-decrypt-version", min_decrypt_version,
                      "set-min-decrypt-version: the new minimum");
  propose->add_option("--waiting-days", waiting_days,
                      "schedule-key-deletion: 7..30 (default: the server's)");
  std::string mount, principal, token_id;
  uint32_t ttl_days = 0;
  std::vector<uint32_t> tde_key_ids;
  propose->add_option("--mount", mount,
                      "create-tde-key, rotate-tde-key, issue-database-token: the gateway mount");
  propose->add_option("--key-id", tde_key_ids,
                      "create-tde-key, rotate-tde-key: the database's key id; "
                      "issue-database-token: a key id the token may read, repeatable");
  propose->add_option("--principal", principal, "issue-database-token: the database principal");
  propose->add_option("--ttl-days", ttl_days, "issue-database-token: 1..366");
  propose->add_option("--token-id", token_id, "revoke-database-token: the token's id");
  uint64_t archive_through = 0;
  propose->add_option("--through", archive_through,
                      "archive-audit-log: the seq of a stored signed checkpoint");
  CLI::App* claim = app.add_subcommand(
      "claim-database-token",
      "take the gateway token issued to you, once (database); prints it: keep it secret");
  claim->add_option("token_id", token_id, "the id the issuing request's reason names")->required();
  CLI::App* approve = app.add_subcommand("approve", "approve a request (another officer)");
  approve->add_option("request", request_id, "request id")->required();
  approve
      ->add_option("--digest", digest,
                   "the digest of the request you reviewed (get-request shows it)")
      ->required();
  CLI::App* reject = app.add_subcommand("reject", "reject a request (officer)");
  reject->add_option("request", request_id, "request id")->required();
  reject->add_option("--reason", reason, "why")->required();
  CLI::App* get_request = app.add_subcommand("get-request", "show a request (officer)");
  get_request->add_option("request", request_id, "request id")->required();
  CLI::App* list_requests = app.add_subcommand("list-requests", "list requests (officer)");
  list_requests->add_option("--state", state, "pending, executed, rejected, expired, failed");
  list_requests->add_option("--key", key, "only this key (id or alias)");
  list_requests->add_option("--page-size", page_size);
  list_requests->add_option("--page-token", page_token);
  CLI::App* audit = app.add_subcommand("audit", "the audit log (auditor)");
  audit->require_subcommand(1);
  std::string out_dir;
  uint64_t from_seq = 1;
  CLI::App* checkpoint = audit->add_subcommand(
      "checkpoint", "the latest signed checkpoint, as JSON (keep it off the server)");
  checkpoint->add_option("--out-dir", out_dir,
                         "also write checkpoint.msg, checkpoint.sig and audit-public.pem here, "
                         "for `openssl dgst -sha256 -verify`");
  CLI::App* export_log = audit->add_subcommand("export", "records as JSON Lines, for a SIEM");
  export_log->add_option("--from", from_seq, "first seq (default 1)");
  std::vector<std::string> export_files;
  std::string db_file, anchor_file, public_key_file;
  CLI::App* verify = audit->add_subcommand(
      "verify",
      "verify the log offline (exports or archives, and/or the database file with its stored "
      "checkpoints): the chain, and the anchor checkpoint if given. Several are verified as "
      "one log, in the order given: the archives oldest first, then an export or --db");
  verify->add_option("export", export_files,
                     "JSON Lines from `audit export`, or archive files (audit-*.jsonl)");
  verify->add_option("--db", db_file,
                     "the server's database file (read only), or a copy; after any files");
  verify->add_option("--anchor", anchor_file, "checkpoint.json kept from `audit checkpoint`");
  verify->add_option("--public-key", public_key_file, "audit-public.pem from `audit checkpoint`")
      ->required();
  std::string backup_db, backup_out;
  CLI::App* backup = app.add_subcommand(
      "backup",
      "copy the key database online (on the server's host, as its user), for a restore with "
      "the HSM token's backup of the same roots: docs/OPERATIONS.md");
  backup->add_option("--db", backup_db, "the server's database file (read only)")->required();
  backup->add_option("out", backup_out, "the new backup file (never overwritten)")->required();
  std::string health_service;
  double health_timeout = 5;
  CLI::App* health = app.add_subcommand(
      "health", "is custosd serving? exit 0 if SERVING, 1 if not or no answer (any principal)");
  health->add_option("--service", health_service,
                     "one service, e.g. custos.v1.KeyService (default: the whole server)");
  health->add_option("--timeout", health_timeout, "seconds to wait for the answer (default 5)")
      ->check(CLI::Range(0.1, 300.0));
  CLI11_PARSE(app, argc, argv);

  try {
    const std::vector<std::string> from_stdin = [&] {
      std::vector<std::string> flags;
      if (encrypt->parsed() && plaintext_from->count() > 0 && plaintext_file == "-") {
        flags.push_back("--plaintext-file");
      }
      if (context_file == "-") flags.push_back("--context-file");
      if (dest_context_file == "-") flags.push_back("--to-context-file");
      return flags;
    }();
    if (from_stdin.size() > 1) {
      throw CLI::ValidationError(from_stdin[0] + " and " + from_stdin[1] +
                                 " cannot both read standard input");
    }
    // Read before connecting: the call's deadline does not wait for a slow standard input.
    if (encrypt->parsed()) {
      if (plaintext_text->count() == 0 && plaintext_from->count() == 0) {
        throw CLI::RequiredError("--plaintext or --plaintext-file");
      }
      if (plaintext_from->count() > 0) {
        plaintext = ReadBounded(plaintext_file, 4096, "encrypt");  // kMaxEncryptPlaintextBytes
      }
    }
    if (!context_file.empty()) {
      for (std::string& pair : ReadPairs(context_file)) context_pairs.push_back(std::move(pair));
    }
    if (!dest_context_file.empty()) {
      for (std::string& pair : ReadPairs(dest_context_file)) {
        dest_context_pairs.push_back(std::move(pair));
      }
    }
    if (backup->parsed()) return BackupDatabase(backup_db, backup_out);
    if (verify->parsed()) {
      if (export_files.empty() && db_file.empty()) {
        throw CLI::ValidationError("give an export or archive file, or --db");
      }
      return VerifyLog(export_files, db_file, anchor_file, public_key_file);
    }
    auto channel = Connect(conn);
    if (health->parsed()) return CheckHealth(channel, health_service, health_timeout);
    auto keys = pb::KeyService::NewStub(channel);
    auto admin = pb::AdminService::NewStub(channel);
    const auto context = ParsePairs(context_pairs, "--context/--context-file");
    const auto ctx = NewContext();
    pb::CreateKeyRequest create_req;
    create_req.set_alias(alias);
    create_req.set_description(description);
    for (const auto& [k, v] : ParsePairs(tags, "--tag")) (*create_req.mutable_tags())[k] = v;
    for (const auto& p : encrypters) create_req.add_encrypt_principals(p);
    for (const auto& p : decrypters) create_req.add_decrypt_principals(p);
    create_req.set_rotation_period_days(rotation_days);
    if (checkpoint->parsed()) {
      pb::Checkpoint reply;
      const grpc::Status status =
          pb::AuditService::NewStub(channel)->GetCheckpoint(ctx.get(), {}, &reply);
      if (status.ok() && !out_dir.empty()) WriteCheckpointFiles(out_dir, reply);
      return Print(status, reply);
    }
    if (export_log->parsed()) {
      pb::ReadRecordsRequest req;
      req.set_from_seq(from_seq);
      auto audit_stub = pb::AuditService::NewStub(channel);
      auto reader = audit_stub->ReadRecords(ctx.get(), req);
      pb::AuditRecord record;
      uint64_t last_seq = 0;
      while (reader->Read(&record)) {
        std::cout << audit::ToJsonLine(custos::server::FromProto(record)) << "\n";
        last_seq = record.seq();
      }
      if (const grpc::Status status = reader->Finish(); !status.ok()) return Print(status, record);
      // Then the signed checkpoints over what was exported (none beyond it: the verifier would
      // take a checkpoint past the end for a truncated tail), so the export checks on its own.
      pb::ReadCheckpointsRequest checkpoints_req;
      checkpoints_req.set_from_seq(from_seq);
      const auto checkpoints_ctx = NewContext();
      auto checkpoints = audit_stub->ReadCheckpoints(checkpoints_ctx.get(), checkpoints_req);
      pb::Checkpoint checkpoint;
      while (checkpoints->Read(&checkpoint)) {
        if (checkpoint.seq() > last_seq) continue;
        std::cout << audit::CheckpointToJsonLine(custos::server::FromProto(checkpoint)) << "\n";
      }
      if (const grpc::Status status = checkpoints->Finish(); !status.ok()) {
        return Print(status, checkpoint);
      }
      std::cout.flush();
      if (!std::cout) {
        std::cerr << "error: cannot write the export to standard output\n";
        return 2;
      }
      return 0;
    }
    if (create->parsed()) {
      pb::KeyMetadata reply;
      return Print(admin->CreateKey(ctx.get(), create_req, &reply), reply);
    }
    if (propose->parsed()) {
      pb::ProposeRequest req;
      pb::Operation op = pb::OPERATION_UNSPECIFIED;
      std::string enum_name = operation;
      for (char& c : enum_name) c = c == '-' ? '_' : static_cast<char>(std::toupper(c));
      if (!pb::Operation_Parse(enum_name, &op) || op == pb::OPERATION_UNSPECIFIED) {
        throw CLI::ValidationError("unknown operation '" + operation + "'");
      }
      req.set_operation(op);
      req.set_key(key);
      req.set_justification(justification);
      // Every flag given is sent, whichever the operation: the server refuses one the
      // operation does not use, naming it, where dropping it here would have the officers
      // approve something other than what was asked.
      pb::CreateKeyRequest key_params = create_req;
      if (op != pb::CREATE_KEY) {  // --encrypt and --decrypt are then the request's own
        key_params.clear_encrypt_principals();
        key_params.clear_decrypt_principals();
        for (const auto& p : encrypters) req.add_encrypt_principals(p);
        for (const auto& p : decrypters) req.add_decrypt_principals(p);
      }
      if (key_params.ByteSizeLong() != 0) *req.mutable_create_key() = key_params;
      req.set_min_decrypt_version(min_decrypt_version);
      req.set_deletion_waiting_days(waiting_days);
      pb::DatabaseTokenParams token;
      token.set_principal(principal);
      token.set_ttl_days(ttl_days);
      if (op == pb::ISSUE_DATABASE_TOKEN) {
        token.set_mount(mount);
        for (uint32_t id : tde_key_ids) token.add_key_ids(id);
      } else {
        const bool tde = op == pb::CREATE_TDE_KEY || op == pb::ROTATE_TDE_KEY;
        if (tde_key_ids.size() > 1 || (tde && tde_key_ids.empty())) {
          throw CLI::ValidationError("give one --key-id");
        }
        pb::TdeKeyParams tde_key;
        tde_key.set_mount(mount);
        if (!tde_key_ids.empty()) tde_key.set_key_id(tde_key_ids.front());
        if (op == pb::CREATE_TDE_KEY) {
          tde_key.set_key(key);
          req.clear_key();  // the sealing key is a parameter, not the request's key
        }
        if (tde_key.ByteSizeLong() != 0) *req.mutable_tde_key() = tde_key;
      }
      if (token.ByteSizeLong() != 0) *req.mutable_database_token() = token;
      req.set_token_id(token_id);
      req.set_archive_through(archive_through);
      pb::ChangeRequest reply;
      return Print(admin->Propose(ctx.get(), req, &reply), reply);
    }
    if (claim->parsed()) {
      pb::ClaimDatabaseTokenRequest req;
      req.set_token_id(token_id);
      pb::ClaimDatabaseTokenResponse reply;
      return Print(
          pb::DatabaseService::NewStub(channel)->ClaimDatabaseToken(ctx.get(), req, &reply), reply);
    }
    if (approve->parsed()) {
      pb::ApproveRequest req;
      req.set_request_id(request_id);
      req.set_digest(digest);
      pb::ChangeRequest reply;
      return Print(admin->Approve(ctx.get(), req, &reply), reply);
    }
    if (reject->parsed()) {
      pb::RejectRequest req;
      req.set_request_id(request_id);
      req.set_reason(reason);
      pb::ChangeRequest reply;
      return Print(admin->Reject(ctx.get(), req, &reply), reply);
    }
    if (get_request->parsed()) {
      pb::GetRequestRequest req;
      req.set_request_id(request_id);
      pb::ChangeRequest reply;
      return Print(admin->GetRequest(ctx.get(), req, &reply), reply);
    }
    if (list_requests->parsed()) {
      pb::ListRequestsRequest req;
      if (!state.empty()) {
        pb::RequestState parsed = pb::REQUEST_STATE_UNSPECIFIED;
        std::string enum_name = state;
        for (char& c : enum_name) c = static_cast<char>(std::toupper(c));
        if (!pb::RequestState_Parse(enum_name, &parsed)) {
          throw CLI::ValidationError("unknown state '" + state + "'");
        }
        req.set_state(parsed);
      }
      req.set_key(key);
      req.set_page_size(page_size);
      req.set_page_token(page_token);
      pb::ListRequestsResponse reply;
      return Print(admin->ListRequests(ctx.get(), req, &reply), reply);
    }
    if (describe->parsed()) {
      pb::DescribeKeyRequest req;
      req.set_key(key);
      pb::KeyMetadata reply;
      return Print(admin->DescribeKey(ctx.get(), req, &reply), reply);
    }
    if (list->parsed()) {
      pb::ListKeysRequest req;
      req.set_page_size(page_size);
      req.set_page_token(page_token);
      pb::ListKeysResponse reply;
      return Print(admin->ListKeys(ctx.get(), req, &reply), reply);
    }
    if (encrypt->parsed()) {
      pb::EncryptRequest req;
      req.set_key(key);
      req.set_plaintext(plaintext);
      req.mutable_encryption_context()->insert(context.begin(), context.end());
      pb::EncryptResponse reply;
      return Print(keys->Encrypt(ctx.get(), req, &reply), reply);
    }
    if (decrypt->parsed()) {
      pb::DecryptRequest req;
      req.set_ciphertext_blob(Base64Decode(blob));
      req.mutable_encryption_context()->insert(context.begin(), context.end());
      pb::DecryptResponse reply;
      return Print(keys->Decrypt(ctx.get(), req, &reply), reply);
    }
    if (reencrypt->parsed()) {
      pb::ReEncryptRequest req;
      req.set_ciphertext_blob(Base64Decode(blob));
      req.mutable_source_encryption_context()->insert(context.begin(), context.end());
      req.set_destination_key(destination);
      const auto dest = ParsePairs(dest_context_pairs, "--to-context/--to-context-file");
      req.mutable_destination_encryption_context()->insert(dest.begin(), dest.end());
      pb::ReEncryptResponse reply;
      return Print(keys->ReEncrypt(ctx.get(), req, &reply), reply);
    }
    pb::GenerateDataKeyRequest req;
    req.set_key(key);
    req.set_key_spec(aes128 ? pb::AES_128 : pb::AES_256);
    req.mutable_encryption_context()->insert(context.begin(), context.end());
    if (app.got_subcommand("generate-data-key")) {
      pb::GenerateDataKeyResponse reply;
      return Print(keys->GenerateDataKey(ctx.get(), req, &reply), reply);
    }
    pb::GenerateDataKeyWithoutPlaintextResponse reply;
    return Print(keys->GenerateDataKeyWithoutPlaintext(ctx.get(), req, &reply), reply);
  } catch (const CLI::Error& e) {
    return app.exit(e);
  } catch (const std::runtime_error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}

int main(int argc, char** argv) {
  // What it prints or sends (data keys, plaintexts) never goes to a core dump.
  rlimit none{0, 0};
  setrlimit(RLIMIT_CORE, &none);
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {  // e.g. out of memory: said, never a crash dump
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
