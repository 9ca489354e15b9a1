// SessionPool: a bounded set of logged-in PKCS#11 sessions shared by worker threads.
//
// PKCS#11 login state belongs to the application, not to a session: one C_Login covers every
// session this process has with the token, and a C_Logout on any of them would log them all
// out. So the pool logs in once, never logs out, and only closes sessions the HSM says are
// gone. Closing an application's last session also ends its login, and a token may be pulled
// and reinserted, so every session the pool opens is checked and logged in again if needed;
// the PIN is kept (in SecureBytes) for that. After a PIN rejection the pool stops presenting it,
// so that retries cannot lock the token. A rejection is PERMISSION_DENIED only at start-up
// (Create); later (the PIN was changed under a running server) it is UNAVAILABLE with a message
// for the operator, so that no caller mistakes it for a permission of its own.
//
// A caller borrows a session through a Lease, which gives it back when destroyed. When all
// sessions are leased, Acquire() waits up to the configured timeout.
//
// Thread-safe. All leases must be returned before the pool is destroyed.
#pragma once

#include <p11-kit/pkcs11.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/secure_bytes.h"
#include "common/status.h"
#include "hsm/pkcs11_module.h"

namespace custos::hsm {

class SessionPool {
 public:
  struct Options {
    size_t size = 8;                               // Sessions open at most (leased + idle).
    std::chrono::milliseconds wait_timeout{5000};  // Acquire() gives up after this.
  };

  // Finds the token, opens a first session and logs in with `pin`. NOT_FOUND (no such token),
  // PERMISSION_DENIED (PIN rejected), UNAVAILABLE (token unreachable), INVALID_ARGUMENT (size 0).
  static absl::StatusOr<std::unique_ptr<SessionPool>> Create(
      std::shared_ptr<const Pkcs11Module> module, std::string token_label, SecureBytes pin,
      Options options);

  ~SessionPool();
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  // A borrowed session. Move-only; returns the session to the pool when destroyed, or closes it
  // if MarkBroken() was called or the pool was flushed meanwhile (DiscardAll()).
  class Lease {
   public:
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { Return(); }

    CK_SESSION_HANDLE handle() const { return handle_; }
    // The session must not be reused (the HSM reported it dead or in an unknown state).
    void MarkBroken() { broken_ = true; }

   private:
    friend class SessionPool;
    Lease(SessionPool* pool, CK_SESSION_HANDLE handle, uint64_t epoch)
        : pool_(pool), handle_(handle), epoch_(epoch) {}
    void Return();

    SessionPool* pool_;
    CK_SESSION_HANDLE handle_;
    uint64_t epoch_;
    bool broken_ = false;
  };

  // Borrows an idle session, or opens one if fewer than `size` are open. UNAVAILABLE if none
  // frees up within the wait timeout or the token cannot be reached.
  absl::StatusOr<Lease> Acquire();

  // Opens a logged-in session outside the pool's bound, owned by the caller (the key cache's
  // session). Close it with CloseSession().
  absl::StatusOr<CK_SESSION_HANDLE> OpenSession();
  void CloseSession(CK_SESSION_HANDLE session);

  // Logs in again if the application's login was lost; cheap when it was not. UNAVAILABLE if
  // the HSM refuses the PIN, then and on every later call (the PIN is not presented again).
  absl::Status EnsureLoggedIn(CK_SESSION_HANDLE session);

  // Closes every idle session and makes leased ones close on return. Called when the token
  // was lost, so that no caller is handed a session from before the loss.
  void DiscardAll();

  // Lets `delta` more (or fewer) sessions be open at once than Options::size: one more for
  // each call set aside inside the module (see hsm/call_executor.h), whose session stays
  // leased until the module lets the call go. A session leased by a set-aside call is closed
  // when it comes back, never handed out again.
  void AddSpare(int delta);

  // The module was finalised: every session it had is gone with it. Forgets them without
  // closing them (after C_Initialize their handles may name new sessions); leases still out
  // (there must be none) would be dropped on return.
  void Abandon();

  // After the module was initialised again: finds the token by label (its slot may have
  // changed) and opens and logs in a first session. Errors as Create().
  absl::Status Reconnect();

  // How long the oldest lease still out has been out (zero if none): a call that never
  // returns from the module (PKCS#11 has no timeout) shows here.
  std::chrono::steady_clock::duration LongestLease() const;

  const std::shared_ptr<const Pkcs11Module>& module() const { return module_; }

 private:
  SessionPool(std::shared_ptr<const Pkcs11Module> module, std::string token_label, CK_SLOT_ID slot,
              SecureBytes pin, Options options);
  absl::StatusOr<CK_SESSION_HANDLE> OpenOnSlot(CK_SLOT_ID slot);
  void Release(CK_SESSION_HANDLE handle, uint64_t epoch, bool broken);

  const std::shared_ptr<const Pkcs11Module> module_;
  const std::string token_label_;
  const Options options_;

  std::mutex login_mu_;  // Serialises C_Login; guards the three fields below.
  SecureBytes pin_;
  bool pin_rejected_ = false;
  bool started_ = false;  // Create() is done: a PIN rejection is no longer at start-up.

  mutable std::mutex mu_;  // Guards everything below.
  std::condition_variable freed_;
  CK_SLOT_ID slot_;  // Found again if the token moves to another slot.
  std::vector<CK_SESSION_HANDLE> idle_;
  size_t leased_ = 0;
  int64_t spare_ = 0;  // AddSpare(): sessions allowed beyond options_.size.
  std::map<CK_SESSION_HANDLE, std::chrono::steady_clock::time_point> leased_since_;
  uint64_t epoch_ = 0;  // Bumped by DiscardAll(); leases from older epochs are closed.
};

}  // namespace custos::hsm
