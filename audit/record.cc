#include "audit/record.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "absl/strings/escaping.h"
#include "common/strings.h"

namespace custos::audit {
namespace {

using Json = nlohmann::ordered_json;

void AppendField(Bytes& out, std::string_view field) {
  const auto size = static_cast<uint32_t>(field.size());
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(size >> shift));
  out.insert(out.end(), field.begin(), field.end());
}

// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF. The same
// rule nlohmann::json applies when it writes a string.
bool IsUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t extra = 0;
    uint32_t min = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      extra = 1, min = 0x80, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      extra = 2, min = 0x800, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      extra = 3, min = 0x10000, cp = c & 0x07;
    } else {
      return false;
    }
    if (s.size() - i <= extra) return false;
    for (size_t k = 1; k <= extra; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += extra + 1;
  }
  return true;
}

std::string Base64(std::span<const uint8_t> bytes) {
  return absl::Base64Escape(
      absl::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

// Canonical (padded, no whitespace) base64 only: what Base64() writes.
absl::StatusOr<std::string> FromBase64(std::string_view text, std::string_view what) {
  std::string out;
  if (!absl::Base64Unescape(absl::string_view(text.data(), text.size()), &out) ||
      absl::Base64Escape(out) != text) {
    return absl::InvalidArgumentError(StrCat(what, " is not base64"));
  }
  return out;
}

// What PutString writes as the readable member for `value`, which is not valid UTF-8: the
// bytes with U+FFFD in place of each bad sequence.
std::string Readable(const std::string& value) {
  return Json::parse(Json(value).dump(-1, ' ', false, Json::error_handler_t::replace), nullptr,
                     /*allow_exceptions=*/false)
      .get<std::string>();
}

void PutString(Json& json, const char* name, const std::string& value) {
  if (IsUtf8(value)) {
    json[name] = value;
    return;
  }
  // Readable text for a SIEM, and the exact bytes for the verifier.
  json[name] = Readable(value);
  json[StrCat(name, "_base64")] =
      Base64({reinterpret_cast<const uint8_t*>(value.data()), value.size()});
}

// A string member, as written.
absl::StatusOr<std::string> GetText(const Json& json, const std::string& name) {
  const auto it = json.find(name);
  if (it == json.end()) return absl::InvalidArgumentError(StrCat("missing field \"", name, "\""));
  if (!it->is_string()) return absl::InvalidArgumentError(StrCat(name, ": not a string"));
  return it->get<std::string>();
}

// A string member written by PutString: its exact bytes. The record has one reading only:
// "_base64" stands only for bytes that are not UTF-8, beside a plain member that is absent or
// their readable rendering; otherwise a SIEM would show one text and the verifier check another.
absl::StatusOr<std::string> GetString(const Json& json, const std::string& name) {
  const auto exact = json.find(name + "_base64");
  if (exact == json.end()) return GetText(json, name);
  if (!exact->is_string()) return absl::InvalidArgumentError(StrCat(name, "_base64: not a string"));
  CUSTOS_ASSIGN_OR_RETURN(std::string bytes,
                          FromBase64(exact->get_ref<const std::string&>(), name + "_base64"));
  if (IsUtf8(bytes)) {
    return absl::InvalidArgumentError(
        StrCat(name, "_base64 holds valid UTF-8: the text belongs in \"", name, "\" alone"));
  }
  const auto plain = json.find(name);
  if (plain != json.end() &&
      (!plain->is_string() || plain->get<std::string>() != Readable(bytes))) {
    return absl::InvalidArgumentError(
        StrCat(name, " and ", name, "_base64 disagree: the record has two readings"));
  }
  return bytes;
}

// An integer member that fits in T.
template <typename T>
absl::StatusOr<T> GetInteger(const Json& json, const std::string& name) {
  const auto it = json.find(name);
  if (it == json.end()) return absl::InvalidArgumentError(StrCat("missing field \"", name, "\""));
  if (it->is_number_unsigned()) {
    const auto value = it->get<uint64_t>();
    if (value <= static_cast<uint64_t>(std::numeric_limits<T>::max())) {
      return static_cast<T>(value);
    }
  } else if constexpr (std::numeric_limits<T>::is_signed) {
    if (it->is_number_integer()) {
      const auto value = it->get<int64_t>();
      if (value >= std::numeric_limits<T>::min()) return static_cast<T>(value);
    }
  }
  return absl::InvalidArgumentError(StrCat(name, ": not an integer in range"));
}

absl::StatusOr<Bytes> GetHash(const Json& json) {
  CUSTOS_ASSIGN_OR_RETURN(const std::string hex, GetText(json, "hash"));
  absl::StatusOr<Bytes> hash = FromHex(hex);
  if (!hash.ok() || hash->size() != kHashBytes) {
    return absl::InvalidArgumentError("hash: not 64 lower-case hex digits");
  }
  return hash;
}

// A JSON object with one reading: a member named twice (which a parser keeps the last of, and
// a SIEM may show the first of) makes the line invalid.
absl::StatusOr<Json> ParseObject(std::string_view text) {
  std::vector<std::set<std::string>> names;  // per open object
  std::string duplicate;
  const Json::parser_callback_t track = [&](int /*depth*/, Json::parse_event_t event,
                                            Json& parsed) {
    if (event == Json::parse_event_t::object_start) names.emplace_back();
    if (event == Json::parse_event_t::object_end && !names.empty()) names.pop_back();
    if (event == Json::parse_event_t::key && !names.empty() && duplicate.empty() &&
        !names.back().insert(parsed.get<std::string>()).second) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  Json json = Json::parse(text.begin(), text.end(), track, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError("not a JSON object");
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(
        StrCat("member \"", duplicate, "\" appears twice (a line must have one reading)"));
  }
  return json;
}

}  // namespace

Record RecordFromEvent(const Event& event, uint64_t seq) {
  Record record;
  record.seq = seq;
  record.time = event.time;
  record.principal = event.principal;
  record.role = event.role;
  record.action = event.action;
  record.key_id = event.key_id;
  record.key_version = event.key_version;
  record.source_key_id = event.source_key_id;
  record.source_key_version = event.source_key_version;
  record.request_id = event.request_id;
  record.outcome = std::string(absl::StatusCodeToString(event.outcome));
  record.peer = event.peer;
  record.context_hmac = event.context_hmac;
  record.detail = event.detail;
  record.call_id = event.call_id;
  record.row = event.row;
  return record;
}

Bytes Canonical(const Record& record) {
  const std::string_view magic = record.format == 1 ? kCanonicalMagic : kCanonicalMagicV2;
  Bytes out(magic.begin(), magic.end());
  AppendField(out, std::to_string(record.seq));
  AppendField(out, std::to_string(record.time));
  AppendField(out, record.principal);
  AppendField(out, record.role);
  AppendField(out, record.action);
  AppendField(out, record.key_id);
  AppendField(out, std::to_string(record.key_version));
  AppendField(out, record.source_key_id);
  AppendField(out, std::to_string(record.source_key_version));
  AppendField(out, record.request_id);
  AppendField(out, record.outcome);
  AppendField(out, record.peer);
  AppendField(out, record.context_hmac);
  AppendField(out, record.detail);
  if (record.format != 1) {
    AppendField(out, record.call_id);
    AppendField(out, record.row);
    AppendField(out, record.row_digest);
  }
  return out;
}

Bytes ChainHash(std::span<const uint8_t> prev_hash, const Record& record) {
  const Bytes canonical = Canonical(record);
  Bytes hash(kHashBytes);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  unsigned int length = 0;
  // SHA-256 fails only on allocation failure, which the server cannot survive anyway.
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), prev_hash.data(), prev_hash.size()) != 1 ||
      EVP_DigestUpdate(ctx.get(), canonical.data(), canonical.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), hash.data(), &length) != 1 || length != kHashBytes) {
    std::abort();
  }
  return hash;
}

Chain::Chain() : last_hash_(kHashBytes, 0) {}

absl::StatusOr<Chain> Chain::Resume(uint64_t last_seq, std::span<const uint8_t> last_hash) {
  if (last_hash.size() != kHashBytes) {
    return absl::InvalidArgumentError("chain hash must be 32 bytes");
  }
  if (last_seq == 0 &&
      std::any_of(last_hash.begin(), last_hash.end(), [](uint8_t b) { return b; })) {
    return absl::InvalidArgumentError("an empty log's chain hash is 32 zero bytes");
  }
  Chain chain;
  chain.last_seq_ = last_seq;
  chain.last_hash_.assign(last_hash.begin(), last_hash.end());
  return chain;
}

void Chain::Seal(Record& record) {
  record.seq = last_seq_ + 1;
  record.hash = ChainHash(last_hash_, record);
  last_seq_ = record.seq;
  last_hash_ = record.hash;
}

std::string CheckpointMessage(const Checkpoint& c) {
  if (c.format == 1) {
    return StrCat("custos-audit-checkpoint-v1\nseq=", c.seq, "\nhash=", ToHex(c.hash),
                  "\ntime=", c.time, "\n");
  }
  return StrCat("custos-audit-checkpoint-v2\nseq=", c.seq, "\nhash=", ToHex(c.hash),
                "\ntime=", c.time, "\nprev_seq=", c.prev_seq, "\nprev_hash=", ToHex(c.prev_hash),
                "\n");
}

std::string ToHex(std::span<const uint8_t> bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    hex.push_back(kHex[b >> 4]);
    hex.push_back(kHex[b & 0x0f]);
  }
  return hex;
}

absl::StatusOr<Bytes> FromHex(std::string_view hex) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (hex.size() % 2 != 0) return absl::InvalidArgumentError("hex of odd length");
  Bytes out;
  out.reserve(hex.size() / 2);
  for (size_t i = 0; i < hex.size(); i += 2) {
    const int hi = nibble(hex[i]);
    const int lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0) return absl::InvalidArgumentError("not lower-case hex");
    out.push_back(static_cast<uint8_t>(hi << 4 | lo));
  }
  return out;
}

std::string ToJsonLine(const Record& record) {
  Json json = Json::object();
  json["seq"] = record.seq;
  json["time"] = record.time;
  PutString(json, "principal", record.principal);
  PutString(json, "role", record.role);
  PutString(json, "action", record.action);
  PutString(json, "key_id", record.key_id);
  json["key_version"] = record.key_version;
  PutString(json, "source_key_id", record.source_key_id);
  json["source_key_version"] = record.source_key_version;
  PutString(json, "request_id", record.request_id);
  PutString(json, "outcome", record.outcome);
  PutString(json, "peer", record.peer);
  PutString(json, "context_hmac", record.context_hmac);
  PutString(json, "detail", record.detail);
  if (record.format != 1) {
    json["format"] = record.format;
    PutString(json, "call_id", record.call_id);
    PutString(json, "row", record.row);
    PutString(json, "row_digest", record.row_digest);
  }
  json["hash"] = ToHex(record.hash);
  return json.dump();
}

absl::StatusOr<Record> FromJsonLine(std::string_view line) {
  CUSTOS_ASSIGN_OR_RETURN(const Json json, ParseObject(line));
  Record r;
  CUSTOS_ASSIGN_OR_RETURN(r.seq, GetInteger<uint64_t>(json, "seq"));
  CUSTOS_ASSIGN_OR_RETURN(r.time, GetInteger<int64_t>(json, "time"));
  CUSTOS_ASSIGN_OR_RETURN(r.principal, GetString(json, "principal"));
  CUSTOS_ASSIGN_OR_RETURN(r.role, GetString(json, "role"));
  CUSTOS_ASSIGN_OR_RETURN(r.action, GetString(json, "action"));
  CUSTOS_ASSIGN_OR_RETURN(r.key_id, GetString(json, "key_id"));
  CUSTOS_ASSIGN_OR_RETURN(r.key_version, GetInteger<uint32_t>(json, "key_version"));
  CUSTOS_ASSIGN_OR_RETURN(r.source_key_id, GetString(json, "source_key_id"));
  CUSTOS_ASSIGN_OR_RETURN(r.source_key_version, GetInteger<uint32_t>(json, "source_key_version"));
  CUSTOS_ASSIGN_OR_RETURN(r.request_id, GetString(json, "request_id"));
  CUSTOS_ASSIGN_OR_RETURN(r.outcome, GetString(json, "outcome"));
  CUSTOS_ASSIGN_OR_RETURN(r.peer, GetString(json, "peer"));
  CUSTOS_ASSIGN_OR_RETURN(r.context_hmac, GetString(json, "context_hmac"));
  CUSTOS_ASSIGN_OR_RETURN(r.detail, GetString(json, "detail"));
  r.format = 1;
  if (json.contains("format")) {
    CUSTOS_ASSIGN_OR_RETURN(r.format, GetInteger<uint32_t>(json, "format"));
    if (r.format != 2) return absl::InvalidArgumentError("format: not a record format (1 or 2)");
    CUSTOS_ASSIGN_OR_RETURN(r.call_id, GetString(json, "call_id"));
    CUSTOS_ASSIGN_OR_RETURN(r.row, GetString(json, "row"));
    CUSTOS_ASSIGN_OR_RETURN(r.row_digest, GetString(json, "row_digest"));
  } else {
    for (const char* v2 : {"call_id", "row", "row_digest"}) {
      if (json.contains(v2) || json.contains(StrCat(v2, "_base64"))) {
        return absl::InvalidArgumentError(
            StrCat(v2, ": a format 2 field in a record without \"format\":2"));
      }
    }
  }
  CUSTOS_ASSIGN_OR_RETURN(r.hash, GetHash(json));
  return r;
}

namespace {

Json CheckpointObject(const Checkpoint& checkpoint) {
  Json json = Json::object();
  json["seq"] = checkpoint.seq;
  json["hash"] = ToHex(checkpoint.hash);
  json["time"] = checkpoint.time;
  if (checkpoint.format != 1) {
    json["prev_seq"] = checkpoint.prev_seq;
    json["prev_hash"] = ToHex(checkpoint.prev_hash);
  }
  PutString(json, "key_label", checkpoint.key_label);
  json["message"] = CheckpointMessage(checkpoint);
  json["signature"] = Base64(checkpoint.signature);
  return json;
}

absl::StatusOr<Checkpoint> CheckpointFromObject(const Json& json) {
  if (!json.is_object()) return absl::InvalidArgumentError("not a JSON object");
  Checkpoint c;
  CUSTOS_ASSIGN_OR_RETURN(c.seq, GetInteger<uint64_t>(json, "seq"));
  if (c.seq == 0) return absl::InvalidArgumentError("seq: a checkpoint covers record 1 or later");
  CUSTOS_ASSIGN_OR_RETURN(c.hash, GetHash(json));
  CUSTOS_ASSIGN_OR_RETURN(c.time, GetInteger<int64_t>(json, "time"));
  c.format = 1;
  if (json.contains("prev_seq")) {
    c.format = 2;
    CUSTOS_ASSIGN_OR_RETURN(c.prev_seq, GetInteger<uint64_t>(json, "prev_seq"));
    CUSTOS_ASSIGN_OR_RETURN(const std::string prev_hex, GetText(json, "prev_hash"));
    absl::StatusOr<Bytes> prev_hash = FromHex(prev_hex);
    if (!prev_hash.ok() || prev_hash->size() != kHashBytes) {
      return absl::InvalidArgumentError("prev_hash: not 64 lower-case hex digits");
    }
    c.prev_hash = *std::move(prev_hash);
  }
  CUSTOS_ASSIGN_OR_RETURN(c.key_label, GetString(json, "key_label"));
  CUSTOS_ASSIGN_OR_RETURN(const std::string signature, GetText(json, "signature"));
  CUSTOS_ASSIGN_OR_RETURN(const std::string der, FromBase64(signature, "signature"));
  c.signature.assign(der.begin(), der.end());
  CUSTOS_ASSIGN_OR_RETURN(const std::string message, GetText(json, "message"));
  if (message != CheckpointMessage(c)) {
    return absl::InvalidArgumentError("message does not match the checkpoint's fields");
  }
  return c;
}

constexpr std::string_view kCheckpointLinePrefix = "{\"checkpoint\":";

}  // namespace

std::string CheckpointToJson(const Checkpoint& checkpoint) {
  return CheckpointObject(checkpoint).dump(2) + "\n";
}

absl::StatusOr<Checkpoint> CheckpointFromJson(std::string_view text) {
  CUSTOS_ASSIGN_OR_RETURN(const Json json, ParseObject(text));
  return CheckpointFromObject(json);
}

std::string CheckpointToJsonLine(const Checkpoint& checkpoint) {
  Json line = Json::object();
  line["checkpoint"] = CheckpointObject(checkpoint);
  return line.dump();  // starts with kCheckpointLinePrefix: one member, no spaces
}

bool IsCheckpointLine(std::string_view line) {
  const size_t start = line.find_first_not_of(" \t");
  return start != std::string_view::npos && line.substr(start).starts_with(kCheckpointLinePrefix);
}

absl::StatusOr<Checkpoint> CheckpointFromJsonLine(std::string_view line) {
  CUSTOS_ASSIGN_OR_RETURN(const Json json, ParseObject(line));
  if (json.size() != 1 || !json.contains("checkpoint")) {
    return absl::InvalidArgumentError("not a checkpoint line");
  }
  return CheckpointFromObject(json["checkpoint"]);
}

}  // namespace custos::audit
