// What custosd writes about itself: every operation appears in its audit lines with the facts
// and outcome, and no secret (context value, plaintext, data key, PIN) ever appears in its log.
#include <google/protobuf/stubs/logging.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

std::string Base64(const std::string& bytes) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const uint32_t n = static_cast<uint8_t>(bytes[i]) << 16 |
                       static_cast<uint8_t>(bytes[i + 1]) << 8 | static_cast<uint8_t>(bytes[i + 2]);
    for (int shift : {18, 12, 6, 0}) out.push_back(kAlphabet[(n >> shift) & 63]);
  }
  return out;  // a prefix is enough to search for
}

std::string Hex(const std::string& bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

TEST_CASE("Audit lines record each operation; no secret reaches the log", "[e2e][audit]") {
  CustosServer server;  // its own log, read whole below
  // The mirror is off by default: the log has no audit lines until it is turned on.
  const std::string alias = "hygiene/key";
  CreateKey(server, "hygiene/unmirrored", false, false);
  CHECK(server.Log().find("action=CreateKey") == std::string::npos);
  server.Stop();
  server.EditConfig("[server]\n", "[log]\naudit_mirror = true\n\n[server]\n");
  server.Start();
  const pb::KeyMetadata key = CreateKey(server, alias, true, true);
  const std::string patient = "patient-7d1f9c-MRN-448812";
  const std::string secret = "db-password-Qx7!vT3#hygiene";

  pb::GenerateDataKeyRequest gdk;
  gdk.set_key(alias);
  (*gdk.mutable_encryption_context())["mrn"] = patient;
  pb::GenerateDataKeyResponse dk;
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());
  pb::EncryptRequest enc;
  enc.set_key(alias);
  enc.set_plaintext(secret);
  (*enc.mutable_encryption_context())["mrn"] = patient;
  pb::EncryptResponse sealed;
  REQUIRE(server.Keys("app")->Encrypt(Context().get(), enc, &sealed).ok());
  pb::DecryptRequest dec;
  dec.set_ciphertext_blob(sealed.ciphertext_blob());
  (*dec.mutable_encryption_context())["mrn"] = patient;
  pb::DecryptResponse opened;
  REQUIRE(server.Keys("app")->Decrypt(Context().get(), dec, &opened).ok());
  REQUIRE(opened.plaintext() == secret);
  (*dec.mutable_encryption_context())["mrn"] = patient + "-other";
  CHECK(server.Keys("app")->Decrypt(Context().get(), dec, &opened).error_code() ==
        grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(server.Keys("officer1")->Decrypt(Context().get(), dec, &opened).error_code() ==
        grpc::StatusCode::PERMISSION_DENIED);

  server.Restart();  // flushes the log and records ServerStop / ServerStart
  const std::string log = server.Log();
  std::ifstream pin_file(server.state_dir() + "/hsm/pin");
  std::string pin;
  std::getline(pin_file, pin);
  REQUIRE(pin.size() == 32);
  for (const std::string& secret_text : {patient, secret, Base64(secret), pin, dk.plaintext(),
                                         Base64(dk.plaintext()), Hex(dk.plaintext())}) {
    INFO("looking for a secret of " << secret_text.size() << " bytes");
    CHECK(log.find(secret_text) == std::string::npos);
  }

  const std::string app = "principal=spiffe://custos.local/app/demo role=app";
  const std::string on_key = " key=" + key.key_id() + " version=1 ";
  for (const std::string& line :
       {app + " action=GenerateDataKey" + on_key, app + " action=Encrypt" + on_key,
        app + " action=Decrypt" + on_key}) {
    INFO(line);
    CHECK(log.find(line) != std::string::npos);
  }
  CHECK(log.find("action=Decrypt" + on_key) != std::string::npos);
  CHECK(log.find("outcome=INVALID_ARGUMENT") != std::string::npos);
  CHECK(log.find("principal=spiffe://custos.local/officer/officer1 role=officer action=Decrypt") !=
        std::string::npos);
  CHECK(log.find("outcome=PERMISSION_DENIED") != std::string::npos);
  for (const char* server_event :
       {"action=ServerStart", "action=LoadPolicy", "action=ServerStop"}) {
    CHECK(log.find(server_event) != std::string::npos);
  }
}

// A refusal's summary quotes the key the caller named; a caller who names a "key" holding a
// newline and terminal escapes must not get a line of its own into the operator's log.
TEST_CASE("A caller's text in a log line cannot forge a line of its own", "[e2e][audit]") {
  CustosServer server;
  const std::string forged = "[2026-12-04 13:00:00.000] [critical] FORGED";
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key("zz\n" + forged + "\x1b[31m");
  for (int i = 0; i < 3; ++i) {
    pb::GenerateDataKeyResponse reply;
    const grpc::Status status = server.Keys("app")->GenerateDataKey(Context().get(), gdk, &reply);
    CHECK(status.error_code() == grpc::StatusCode::PERMISSION_DENIED);
  }
  AwaitLine([&] { return server.Log(); }, "FORGED");
  const std::string log = server.Log();
  INFO(log);
  CHECK_THAT(log, Catch::Contains("key 'zz\\n" + forged + "\\x1b[31m'"));
  CHECK(log.find("\n" + forged) == std::string::npos);
  CHECK(log.find('\x1b') == std::string::npos);
}

// A string field that is not UTF-8 fails to parse: protobuf logs a line for it, gRPC refuses
// the call. Twenty such calls in a row leave one line in custosd's log, not twenty.
TEST_CASE("Malformed messages cannot flood the log", "[e2e][audit]") {
  CustosServer server;
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key("not \xff UTF-8");  // serialised as is; the client's protobuf would log it
  const google::protobuf::LogSilencer quiet_client;
  for (int i = 0; i < 20; ++i) {
    pb::GenerateDataKeyResponse reply;
    const grpc::Status status = server.Keys("app")->GenerateDataKey(Context().get(), gdk, &reply);
    CHECK_FALSE(status.ok());
  }
  // A well-formed call after them: whatever was logged for them is in the log by now.
  pb::GenerateDataKeyResponse reply;
  gdk.set_key("not-a-key");
  CHECK(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &reply).error_code() ==
        grpc::StatusCode::PERMISSION_DENIED);
  const std::string log = server.Log();
  INFO(log);
  CHECK(Occurrences(log, "invalid UTF-8") == 1);
  CHECK(Occurrences(log, "[warning] protobuf ") == 1);
}

TEST_CASE("JSON log lines: one object per line, the call's id as in its audit record",
          "[e2e][audit]") {
  CustosServer server;
  server.Stop();
  server.EditConfig("[server]\n", "[log]\nformat = \"json\"\naudit_mirror = true\n\n[server]\n");
  const size_t text_lines = Occurrences(server.Log(), "\n");
  server.Start();
  const pb::KeyMetadata key = CreateKey(server, "hygiene/json", true, true);
  const std::string patient = "patient \"quoted\" \\ MRN-99";
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key(key.key_id());
  (*gdk.mutable_encryption_context())["mrn"] = patient;
  pb::GenerateDataKeyResponse dk;
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());
  std::string call_id;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    if (r.action() == "GenerateDataKey") call_id = r.call_id();
  }
  REQUIRE(call_id.size() == 36);
  server.Stop();

  // The lines this run wrote (the log before it was in text): each a JSON object.
  std::istringstream lines(server.Log());
  std::string line;
  for (size_t i = 0; i < text_lines && std::getline(lines, line);) ++i;
  size_t objects = 0;
  bool call_line = false;
  while (std::getline(lines, line)) {
    INFO(line);
    const nlohmann::json object = nlohmann::json::parse(line, nullptr, false);
    REQUIRE(object.is_object());
    CHECK(object.size() == 3);
    CHECK(std::regex_match(object.value("time", ""),
                           std::regex(R"(20[0-9-]{8}T[0-9:]{8}\.[0-9]{6}Z)")));
    CHECK(object.value("level", "").size() >= 4);
    const std::string message = object.value("message", "");
    call_line = call_line || (message.find("call=" + call_id) != std::string::npos &&
                              message.find("action=GenerateDataKey") != std::string::npos);
    CHECK(message.find(patient) == std::string::npos);
    ++objects;
  }
  CHECK(objects > 5);
  CHECK(call_line);
}

}  // namespace
}  // namespace custos::testing
