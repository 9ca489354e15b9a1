#include "hsm/session_pool.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "hsm/call_executor.h"
#include "hsm/ck_error.h"

namespace custos::hsm {
namespace {

// Errors after which the token may be back in a different slot (reinserted elsewhere).
bool TokenMayHaveMoved(CK_RV rv) {
  return rv == CKR_SLOT_ID_INVALID || rv == CKR_TOKEN_NOT_PRESENT ||
         rv == CKR_TOKEN_NOT_RECOGNIZED || rv == CKR_DEVICE_REMOVED;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SessionPool>> SessionPool::Create(
    std::shared_ptr<const Pkcs11Module> module, std::string token_label, SecureBytes pin,
    Options options) {
  if (options.size == 0) return absl::InvalidArgumentError("HSM session pool size must be > 0");
  CUSTOS_ASSIGN_OR_RETURN(CK_SLOT_ID slot, module->FindSlot(token_label));
  auto pool = absl::WrapUnique(
      new SessionPool(std::move(module), std::move(token_label), slot, std::move(pin), options));
  // Log in now, so that a wrong PIN or an unreachable token is reported at start-up.
  CUSTOS_ASSIGN_OR_RETURN(CK_SESSION_HANDLE first, pool->OpenSession());
  pool->idle_.push_back(first);
  {
    std::lock_guard lock(pool->login_mu_);
    pool->started_ = true;
  }
  return pool;
}

SessionPool::SessionPool(std::shared_ptr<const Pkcs11Module> module, std::string token_label,
                         CK_SLOT_ID slot, SecureBytes pin, Options options)
    : module_(std::move(module)),
      token_label_(std::move(token_label)),
      options_(options),
      pin_(std::move(pin)),
      slot_(slot) {}

SessionPool::~SessionPool() {
  for (CK_SESSION_HANDLE session : idle_) CloseSession(session);
}

absl::StatusOr<SessionPool::Lease> SessionPool::Acquire() {
  std::unique_lock lock(mu_);
  const bool free = freed_.wait_for(lock, options_.wait_timeout, [this] {
    return !idle_.empty() ||
           static_cast<int64_t>(leased_) < static_cast<int64_t>(options_.size) + spare_;
  });
  if (!free) {
    return absl::UnavailableError(absl::StrCat("no HSM session free after ",
                                               options_.wait_timeout.count(), " ms (pool size ",
                                               options_.size, ")"));
  }
  ++leased_;
  const uint64_t epoch = epoch_;
  if (!idle_.empty()) {
    CK_SESSION_HANDLE session = idle_.back();  // The most recently used one: still warm.
    idle_.pop_back();
    leased_since_[session] = std::chrono::steady_clock::now();
    return Lease(this, session, epoch);
  }
  lock.unlock();  // Opening (and perhaps logging in) is slow; the slot is reserved already.
  absl::StatusOr<CK_SESSION_HANDLE> opened = OpenSession();
  if (!opened.ok()) {
    lock.lock();
    --leased_;
    lock.unlock();
    freed_.notify_one();
    return opened.status();
  }
  lock.lock();
  leased_since_[*opened] = std::chrono::steady_clock::now();
  return Lease(this, *opened, epoch);
}

absl::StatusOr<CK_SESSION_HANDLE> SessionPool::OpenSession() {
  CK_SLOT_ID slot;
  {
    std::lock_guard lock(mu_);
    slot = slot_;
  }
  absl::StatusOr<CK_SESSION_HANDLE> session = OpenOnSlot(slot);
  std::optional<CK_RV> rv = CkrOf(session.status());
  if (session.ok() || !rv || !TokenMayHaveMoved(*rv)) return session;
  absl::StatusOr<CK_SLOT_ID> found = module_->FindSlot(token_label_);
  if (!found.ok() || *found == slot) return session;
  {
    std::lock_guard lock(mu_);
    slot_ = *found;
  }
  return OpenOnSlot(*found);
}

absl::StatusOr<CK_SESSION_HANDLE> SessionPool::OpenOnSlot(CK_SLOT_ID slot) {
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  CK_RV rv = module_->api()->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr,
                                           nullptr, &session);
  if (rv != CKR_OK) return CkError("C_OpenSession", rv);
  if (absl::Status login = EnsureLoggedIn(session); !login.ok()) {
    CloseSession(session);
    return login;
  }
  return session;
}

void SessionPool::CloseSession(CK_SESSION_HANDLE session) {
  // Errors are expected here (the session may be gone with its token) and change nothing.
  module_->api()->C_CloseSession(session);
}

absl::Status SessionPool::EnsureLoggedIn(CK_SESSION_HANDLE session) {
  CK_SESSION_INFO info{};
  CK_RV rv = module_->api()->C_GetSessionInfo(session, &info);
  if (rv != CKR_OK) return CkError("C_GetSessionInfo", rv);
  if (info.state == CKS_RO_USER_FUNCTIONS || info.state == CKS_RW_USER_FUNCTIONS) {
    return absl::OkStatus();
  }
  std::lock_guard lock(login_mu_);
  // Once running, a refused PIN is UNAVAILABLE, not PERMISSION_DENIED: callers must not take
  // it for a missing grant, and only an operator can fix it.
  if (pin_rejected_) {
    return absl::UnavailableError(
        "the HSM refused the configured PIN on an earlier re-login; not presenting it again (it "
        "could lock the token); fix the PIN and restart custosd");
  }
  rv = module_->api()->C_Login(session, CKU_USER, pin_.data(), pin_.size());
  if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) return absl::OkStatus();
  absl::Status error = CkError("C_Login", rv);
  if (error.code() != absl::StatusCode::kPermissionDenied) return error;
  pin_rejected_ = true;
  if (!started_) return error;  // At start-up: reported as it is, to whoever is starting it.
  return absl::UnavailableError(absl::StrCat("the HSM refused the configured PIN on re-login (",
                                             error.message(),
                                             "); fix the PIN and restart custosd"));
}

void SessionPool::DiscardAll() {
  std::vector<CK_SESSION_HANDLE> idle;
  {
    std::lock_guard lock(mu_);
    ++epoch_;
    idle.swap(idle_);
  }
  for (CK_SESSION_HANDLE session : idle) CloseSession(session);
}

void SessionPool::AddSpare(int delta) {
  {
    std::lock_guard lock(mu_);
    spare_ += delta;
  }
  if (delta > 0) freed_.notify_all();
}

void SessionPool::Abandon() {
  std::lock_guard lock(mu_);
  ++epoch_;
  idle_.clear();
}

absl::Status SessionPool::Reconnect() {
  CUSTOS_ASSIGN_OR_RETURN(CK_SLOT_ID slot, module_->FindSlot(token_label_));
  {
    std::lock_guard lock(mu_);
    slot_ = slot;
  }
  CUSTOS_ASSIGN_OR_RETURN(CK_SESSION_HANDLE first, OpenOnSlot(slot));
  {
    std::lock_guard lock(mu_);
    idle_.push_back(first);
  }
  freed_.notify_one();
  return absl::OkStatus();
}

std::chrono::steady_clock::duration SessionPool::LongestLease() const {
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard lock(mu_);
  std::chrono::steady_clock::duration longest{0};
  for (const auto& [session, since] : leased_since_) longest = std::max(longest, now - since);
  return longest;
}

void SessionPool::Release(CK_SESSION_HANDLE session, uint64_t epoch, bool broken) {
  bool keep;
  {
    std::lock_guard lock(mu_);
    --leased_;
    leased_since_.erase(session);
    // A session whose call was set aside may be in any state the module left it in.
    keep = !broken && epoch == epoch_ && !CallExecutor::SetAside();
    if (keep) idle_.push_back(session);
  }
  freed_.notify_one();
  if (!keep) CloseSession(session);
}

SessionPool::Lease::Lease(Lease&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      handle_(other.handle_),
      epoch_(other.epoch_),
      broken_(other.broken_) {}

SessionPool::Lease& SessionPool::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    Return();
    pool_ = std::exchange(other.pool_, nullptr);
    handle_ = other.handle_;
    epoch_ = other.epoch_;
    broken_ = other.broken_;
  }
  return *this;
}

void SessionPool::Lease::Return() {
  if (pool_ != nullptr) std::exchange(pool_, nullptr)->Release(handle_, epoch_, broken_);
}

}  // namespace custos::hsm
