// KeyWorkloads: custos_bench's KeyService calls, as Workloads for RunCalls (bench/load.h).
//
// Requests are serialised once where they repeat (a repeated context; the blobs of Decrypt
// and ReEncrypt) and per call where they must not (a distinct context). Every call picks its
// key from the bench's keys by a hash of its number, so with one key every call uses the same
// (hot) key and with K keys they spread evenly and pseudo-randomly over all of them.
//
// Encryption contexts come in two mixes, so that a server-side cache keyed by context cannot
// flatter the result:
//   repeated  every call {table: patients};
//   distinct  GenerateDataKey, GenerateDataKeyWithoutPlaintext and Encrypt get a context never
//             used before, {row: <run id>-<counter>}; Decrypt and ReEncrypt cycle through a
//             pool of blobs each made under its own context {row: <run id>-b<i>} (a context
//             repeats only every pool-size calls).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "bench/load.h"

namespace custos::bench {

enum class KeyOp {
  kGenerateDataKey,
  kGenerateDataKeyWithoutPlaintext,
  kDecrypt,
  kEncrypt,    // 1 KiB
  kReEncrypt,  // to the blob's own key, same context
  kMix,        // per call: 50% Decrypt, 30% GenerateDataKey, 20% Encrypt
};
inline constexpr KeyOp kAllKeyOps[] = {
    KeyOp::kGenerateDataKey, KeyOp::kGenerateDataKeyWithoutPlaintext,
    KeyOp::kDecrypt,         KeyOp::kEncrypt,
    KeyOp::kReEncrypt,       KeyOp::kMix};
std::string_view KeyOpName(KeyOp op);

enum class ContextMix { kRepeated, kDistinct };
inline constexpr ContextMix kAllContextMixes[] = {ContextMix::kRepeated, ContextMix::kDistinct};
std::string_view ContextMixName(ContextMix mix);

class KeyWorkloads {
 public:
  // `key_ids`: the keys calls use (not empty); the app needs encrypt and decrypt grants on
  // them. `run_id` makes this run's distinct contexts differ from any earlier run's.
  KeyWorkloads(std::vector<std::string> key_ids, std::string run_id);
  KeyWorkloads(const KeyWorkloads&) = delete;
  KeyWorkloads& operator=(const KeyWorkloads&) = delete;

  // Makes the blobs Decrypt and ReEncrypt use: `count` per context mix, with
  // GenerateDataKeyWithoutPlaintext at `inflight` calls in flight, blob i under key i % K.
  // Calls that fail are retried (a few rounds); throws std::runtime_error if blobs are still
  // missing then. Needed before For(kDecrypt | kReEncrypt | kMix, ...).
  void MakeBlobs(const std::vector<grpc::GenericStub*>& stubs, size_t count, int inflight);

  // The calls of `op` with contexts of `mix`. The Workload refers to this object, which must
  // outlive its use.
  Workload For(KeyOp op, ContextMix mix);

  // GenerateDataKey with the repeated context on the first key every call (hot), or on the
  // next key that no earlier cold call of this object used (cold: with enough keys, every call
  // misses every cache of the server), in the keys' order, round again after the last.
  Workload HotKey();
  Workload ColdKeys();
  // Cold calls started so far; above the number of keys, keys were used again.
  uint64_t cold_calls() const { return cold_.load(); }

  // The blobs MakeBlobs made for `mix`, and the context each was made under (for batches).
  struct Blob {
    std::string ciphertext;
    std::map<std::string, std::string> context;
  };
  const std::vector<Blob>& Blobs(ContextMix mix) const;

 private:
  struct Pool {
    std::vector<grpc::ByteBuffer> decrypt;    // DecryptRequest per blob
    std::vector<grpc::ByteBuffer> reencrypt;  // ReEncryptRequest per blob
    std::vector<Blob> blobs;
  };

  size_t KeyIndex(uint64_t n) const;
  // The repeated mix's GenerateDataKeyRequest (both methods) and EncryptRequest for key `key`.
  grpc::ByteBuffer RepeatedDataKey(size_t key) const;
  grpc::ByteBuffer RepeatedEncrypt(size_t key) const;
  // The context of a distinct-mix call that has never been used.
  std::string FreshRow();
  void Next(KeyOp op, ContextMix mix, uint64_t n, Call& call);
  std::string Check(KeyOp op, uint64_t n, grpc::ByteBuffer& reply) const;

  std::vector<std::string> keys_;
  std::string run_id_;
  std::string plaintext_;  // Encrypt's 1 KiB
  std::atomic<uint64_t> fresh_ = 0;
  std::atomic<uint64_t> cold_ = 0;
  // Per key, the repeated mix's requests (none past kMaxPrebuiltKeys keys: made per call).
  std::vector<grpc::ByteBuffer> data_key_repeated_;  // GenerateDataKeyRequest (both methods)
  std::vector<grpc::ByteBuffer> encrypt_repeated_;
  Pool pools_[2];  // by ContextMix
};

}  // namespace custos::bench
