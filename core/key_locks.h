// KeyLocks: one mutex per name (a key, a request), made while someone needs it and dropped
// after. Officer changes to one key are serialised with each other and with the server's own
// (expiry, destruction, automatic rotation), never with changes to other keys: an HSM call that
// stalls one change, up to hsm.call_timeout_ms, holds up nothing else.
//
// Thread-safe. A thread holds one name, or two in one order only: a table-space key id's
// ("tde/..."), then the Custos key that seals it ("key/..."); nothing that holds a key's name
// takes another name.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace custos::core {

class KeyLocks {
 public:
  // A held name; unlocks when destroyed. Move-only; a default one holds nothing.
  class Held {
   public:
    Held() = default;
    Held(Held&& other) noexcept;
    Held& operator=(Held&& other) noexcept;
    Held(const Held&) = delete;
    Held& operator=(const Held&) = delete;
    ~Held() { Unlock(); }

   private:
    friend class KeyLocks;
    Held(KeyLocks* locks, std::string name) : locks_(locks), name_(std::move(name)) {}
    void Unlock();

    KeyLocks* locks_ = nullptr;
    std::string name_;
  };

  // Blocks until `name` is free, then holds it.
  Held Lock(const std::string& name);

 private:
  struct Entry {
    std::mutex mu;
    size_t users = 0;  // holding or waiting; guarded by KeyLocks::mu_
  };
  void Unlock(const std::string& name);

  std::mutex mu_;
  std::map<std::string, std::unique_ptr<Entry>, std::less<>> entries_;
};

}  // namespace custos::core
