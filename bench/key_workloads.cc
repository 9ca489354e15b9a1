#include "bench/key_workloads.h"

#include <stdexcept>

#include "custos/v1/key_service.grpc.pb.h"

namespace custos::bench {
namespace {

namespace pb = custos::v1;

// gRPC keeps a pointer to the method name for each call: these live as long as the process.
const std::string kGenerateDataKey = "/custos.v1.KeyService/GenerateDataKey";
const std::string kGenerateDataKeyWithoutPlaintext =
    "/custos.v1.KeyService/GenerateDataKeyWithoutPlaintext";
const std::string kDecrypt = "/custos.v1.KeyService/Decrypt";
const std::string kEncrypt = "/custos.v1.KeyService/Encrypt";
const std::string kReEncrypt = "/custos.v1.KeyService/ReEncrypt";

constexpr size_t kDataKeyBytes = 32;  // AES_256
constexpr size_t kEncryptBytes = 1024;
constexpr size_t kMaxPrebuiltKeys = 100000;

// splitmix64's finaliser: call numbers to well-spread pseudo-random numbers, the same for the
// same call number (so that Check knows what Next chose).
uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The mix's operation for call n: 50% Decrypt, 30% GenerateDataKey, 20% Encrypt.
KeyOp MixedOp(uint64_t n) {
  const uint64_t tenth = Mix64(n ^ 0x5bd1e995ULL) % 10;
  return tenth < 5 ? KeyOp::kDecrypt : tenth < 8 ? KeyOp::kGenerateDataKey : KeyOp::kEncrypt;
}

grpc::ByteBuffer Serialize(const google::protobuf::MessageLite& message) {
  grpc::Slice slice(message.SerializeAsString());
  return grpc::ByteBuffer(&slice, 1);
}

template <typename Message>
bool Parse(grpc::ByteBuffer& bytes, Message& message) {
  return grpc::SerializationTraits<Message>::Deserialize(&bytes, &message).ok();
}

using Context = google::protobuf::Map<std::string, std::string>;

void SetContext(Context& context, ContextMix mix, const std::string& row) {
  if (mix == ContextMix::kRepeated) {
    context["table"] = "patients";
  } else {
    context["row"] = row;
  }
}

grpc::ByteBuffer DataKeyRequest(const std::string& key, ContextMix mix, const std::string& row) {
  pb::GenerateDataKeyRequest request;
  request.set_key(key);
  SetContext(*request.mutable_encryption_context(), mix, row);
  request.set_key_spec(pb::AES_256);
  return Serialize(request);
}

grpc::ByteBuffer EncryptRequest(const std::string& key, const std::string& plaintext,
                                ContextMix mix, const std::string& row) {
  pb::EncryptRequest request;
  request.set_key(key);
  request.set_plaintext(plaintext);
  SetContext(*request.mutable_encryption_context(), mix, row);
  return Serialize(request);
}

}  // namespace

std::string_view KeyOpName(KeyOp op) {
  switch (op) {
    case KeyOp::kGenerateDataKey:
      return "GenerateDataKey";
    case KeyOp::kGenerateDataKeyWithoutPlaintext:
      return "GenerateDataKeyWithoutPlaintext";
    case KeyOp::kDecrypt:
      return "Decrypt";
    case KeyOp::kEncrypt:
      return "Encrypt(1KiB)";
    case KeyOp::kReEncrypt:
      return "ReEncrypt";
    case KeyOp::kMix:
      return "mix(50D/30G/20E)";
  }
  return "?";
}

std::string_view ContextMixName(ContextMix mix) {
  return mix == ContextMix::kRepeated ? "repeated" : "distinct";
}

KeyWorkloads::KeyWorkloads(std::vector<std::string> key_ids, std::string run_id)
    : keys_(std::move(key_ids)), run_id_(std::move(run_id)) {
  if (keys_.empty()) throw std::invalid_argument("KeyWorkloads: no keys");
  plaintext_.resize(kEncryptBytes);
  for (size_t i = 0; i < plaintext_.size(); ++i) {
    plaintext_[i] = static_cast<char>(Mix64(i) & 0xff);
  }
  // Made once, unless there are so many keys that they would take gigabytes (1 KiB each for
  // Encrypt): then per call.
  if (keys_.size() > kMaxPrebuiltKeys) return;
  for (const std::string& key : keys_) {
    data_key_repeated_.push_back(DataKeyRequest(key, ContextMix::kRepeated, ""));
    encrypt_repeated_.push_back(EncryptRequest(key, plaintext_, ContextMix::kRepeated, ""));
  }
}

grpc::ByteBuffer KeyWorkloads::RepeatedDataKey(size_t key) const {
  return key < data_key_repeated_.size() ? data_key_repeated_[key]
                                         : DataKeyRequest(keys_[key], ContextMix::kRepeated, "");
}

grpc::ByteBuffer KeyWorkloads::RepeatedEncrypt(size_t key) const {
  return key < encrypt_repeated_.size()
             ? encrypt_repeated_[key]
             : EncryptRequest(keys_[key], plaintext_, ContextMix::kRepeated, "");
}

size_t KeyWorkloads::KeyIndex(uint64_t n) const { return Mix64(n) % keys_.size(); }

std::string KeyWorkloads::FreshRow() {
  return run_id_ + "-" + std::to_string(fresh_.fetch_add(1, std::memory_order_relaxed));
}

void KeyWorkloads::MakeBlobs(const std::vector<grpc::GenericStub*>& stubs, size_t count,
                             int inflight) {
  for (ContextMix mix : kAllContextMixes) {
    std::vector<std::string> rows(count);
    std::vector<std::string> blobs(count);  // blob i is written only by the call that made it
    for (size_t i = 0; i < count; ++i) rows[i] = run_id_ + "-b" + std::to_string(i);
    std::string last_error;
    for (int round = 0; round < 10; ++round) {
      std::vector<size_t> missing;
      for (size_t i = 0; i < count; ++i) {
        if (blobs[i].empty()) missing.push_back(i);
      }
      if (missing.empty()) break;
      Workload make;
      make.next = [&](uint64_t n, Call& call) {
        const size_t i = missing[n];
        call.method = &kGenerateDataKeyWithoutPlaintext;
        call.request = DataKeyRequest(keys_[KeyIndex(i)], mix, rows[i]);
      };
      make.check = [&](uint64_t n, grpc::ByteBuffer& reply) {
        pb::GenerateDataKeyWithoutPlaintextResponse response;
        if (!Parse(reply, response) || response.ciphertext_blob().empty()) return "no blob";
        blobs[missing[n]] = response.ciphertext_blob();
        return "";
      };
      const LoadResult made =
          RunCalls(stubs, {.inflight = inflight, .max_calls = missing.size()}, make);
      for (const auto& [code, errors] : made.errors_by_code) {
        last_error = code + ": " + errors.first_message;
      }
    }
    Pool& pool = pools_[static_cast<int>(mix)];
    pool.decrypt.clear();
    pool.reencrypt.clear();
    pool.blobs.clear();
    for (size_t i = 0; i < count; ++i) {
      if (blobs[i].empty()) {
        throw std::runtime_error("cannot make the blobs for Decrypt and ReEncrypt: " + last_error);
      }
      pb::DecryptRequest decrypt;
      decrypt.set_ciphertext_blob(blobs[i]);
      SetContext(*decrypt.mutable_encryption_context(), mix, rows[i]);
      pool.decrypt.push_back(Serialize(decrypt));
      pb::ReEncryptRequest reencrypt;
      reencrypt.set_ciphertext_blob(blobs[i]);
      SetContext(*reencrypt.mutable_source_encryption_context(), mix, rows[i]);
      SetContext(*reencrypt.mutable_destination_encryption_context(), mix, rows[i]);
      pool.reencrypt.push_back(Serialize(reencrypt));
      const Context& context = decrypt.encryption_context();
      pool.blobs.push_back({blobs[i], {context.begin(), context.end()}});
    }
  }
}

void KeyWorkloads::Next(KeyOp op, ContextMix mix, uint64_t n, Call& call) {
  if (op == KeyOp::kMix) op = MixedOp(n);
  const bool repeated = mix == ContextMix::kRepeated;
  const Pool& pool = pools_[static_cast<int>(mix)];
  switch (op) {
    case KeyOp::kGenerateDataKey:
    case KeyOp::kGenerateDataKeyWithoutPlaintext: {
      call.method =
          op == KeyOp::kGenerateDataKey ? &kGenerateDataKey : &kGenerateDataKeyWithoutPlaintext;
      const size_t key = KeyIndex(n);
      call.request = repeated ? RepeatedDataKey(key) : DataKeyRequest(keys_[key], mix, FreshRow());
      return;
    }
    case KeyOp::kEncrypt: {
      call.method = &kEncrypt;
      const size_t key = KeyIndex(n);
      call.request =
          repeated ? RepeatedEncrypt(key) : EncryptRequest(keys_[key], plaintext_, mix, FreshRow());
      return;
    }
    case KeyOp::kDecrypt:
      call.method = &kDecrypt;
      call.request = pool.decrypt[n % pool.decrypt.size()];
      return;
    case KeyOp::kReEncrypt:
      call.method = &kReEncrypt;
      call.request = pool.reencrypt[n % pool.reencrypt.size()];
      return;
    case KeyOp::kMix:
      break;
  }
}

std::string KeyWorkloads::Check(KeyOp op, uint64_t n, grpc::ByteBuffer& reply) const {
  if (op == KeyOp::kMix) op = MixedOp(n);
  switch (op) {
    case KeyOp::kGenerateDataKey: {
      pb::GenerateDataKeyResponse response;
      if (!Parse(reply, response)) return "GenerateDataKey: unreadable reply";
      if (response.plaintext().size() != kDataKeyBytes) return "GenerateDataKey: wrong key size";
      return response.ciphertext_blob().empty() ? "GenerateDataKey: no blob" : "";
    }
    case KeyOp::kGenerateDataKeyWithoutPlaintext: {
      pb::GenerateDataKeyWithoutPlaintextResponse response;
      if (!Parse(reply, response) || response.ciphertext_blob().empty()) {
        return "GenerateDataKeyWithoutPlaintext: no blob";
      }
      return "";
    }
    case KeyOp::kDecrypt: {
      pb::DecryptResponse response;
      if (!Parse(reply, response)) return "Decrypt: unreadable reply";
      return response.plaintext().size() == kDataKeyBytes ? "" : "Decrypt: wrong plaintext size";
    }
    case KeyOp::kEncrypt: {
      pb::EncryptResponse response;
      if (!Parse(reply, response) || response.ciphertext_blob().size() <= kEncryptBytes) {
        return "Encrypt: no or short blob";
      }
      return "";
    }
    case KeyOp::kReEncrypt: {
      pb::ReEncryptResponse response;
      if (!Parse(reply, response) || response.ciphertext_blob().empty()) {
        return "ReEncrypt: no blob";
      }
      return "";
    }
    case KeyOp::kMix:
      break;
  }
  return "unknown operation";
}

Workload KeyWorkloads::HotKey() {
  Workload workload;
  workload.next = [this](uint64_t, Call& call) {
    call.method = &kGenerateDataKey;
    call.request = RepeatedDataKey(0);
  };
  workload.check = [this](uint64_t n, grpc::ByteBuffer& reply) {
    return Check(KeyOp::kGenerateDataKey, n, reply);
  };
  return workload;
}

Workload KeyWorkloads::ColdKeys() {
  Workload workload;
  workload.next = [this](uint64_t, Call& call) {
    call.method = &kGenerateDataKey;
    call.request = RepeatedDataKey(cold_.fetch_add(1) % keys_.size());
  };
  workload.check = [this](uint64_t n, grpc::ByteBuffer& reply) {
    return Check(KeyOp::kGenerateDataKey, n, reply);
  };
  return workload;
}

const std::vector<KeyWorkloads::Blob>& KeyWorkloads::Blobs(ContextMix mix) const {
  return pools_[static_cast<int>(mix)].blobs;
}

Workload KeyWorkloads::For(KeyOp op, ContextMix mix) {
  const bool needs_blobs = op == KeyOp::kDecrypt || op == KeyOp::kReEncrypt || op == KeyOp::kMix;
  if (needs_blobs && pools_[static_cast<int>(mix)].decrypt.empty()) {
    throw std::logic_error(std::string(KeyOpName(op)) + " needs MakeBlobs first");
  }
  Workload workload;
  workload.next = [this, op, mix](uint64_t n, Call& call) { Next(op, mix, n, call); };
  workload.check = [this, op](uint64_t n, grpc::ByteBuffer& reply) { return Check(op, n, reply); };
  return workload;
}

}  // namespace custos::bench
