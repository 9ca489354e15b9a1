#include "hsm/pkcs11_module.h"

#include <dlfcn.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <vector>

#include "absl/memory/memory.h"
#include "hsm/ck_error.h"

namespace custos::hsm {
namespace {

constexpr size_t kTokenLabelBytes = 32;

// Modules initialised by this process, by dlopen handle (which is the same whatever path
// reached the library). An entry whose weak_ptr has expired belongs to a module whose last
// owner is finalising it right now; Load() waits for the entry to go so that a new
// C_Initialize never races an old C_Finalize.
struct Registry {
  std::mutex mu;
  std::condition_variable cv;
  std::map<void*, std::weak_ptr<const Pkcs11Module>> loaded;
};

Registry& GetRegistry() {
  // Leaked on purpose: a module released during static destruction must still find it.
  static Registry& registry = *new Registry;
  return registry;
}

std::string PadLabel(std::string_view label) {
  std::string padded(label);
  padded.resize(kTokenLabelBytes, ' ');
  return padded;
}

}  // namespace

Pkcs11Module::Pkcs11Module(std::string path, void* library, CK_FUNCTION_LIST* api, bool finalize)
    : path_(std::move(path)), library_(library), api_(api), finalize_(finalize) {}

Pkcs11Module::~Pkcs11Module() {
  Registry& registry = GetRegistry();
  {
    std::lock_guard lock(registry.mu);
    if (finalize_) api_->C_Finalize(nullptr);
    registry.loaded.erase(library_);
    dlclose(library_);
  }
  registry.cv.notify_all();
}

absl::StatusOr<std::shared_ptr<const Pkcs11Module>> Pkcs11Module::Load(const std::string& path) {
  Registry& registry = GetRegistry();
  std::unique_lock lock(registry.mu);
  void* library = nullptr;
  for (;;) {
    // Never unmapped, though finalised and closed: what the module leaks stays attributed to
    // it in a leak report (tools/sanitizers/lsan.supp) rather than to an unmapped "<unknown
    // module>".
    library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (library == nullptr) {
      const char* why = dlerror();
      return absl::NotFoundError("cannot load PKCS#11 module '" + path +
                                 "': " + (why ? why : "unknown error"));
    }
    auto it = registry.loaded.find(library);
    if (it == registry.loaded.end()) break;
    std::shared_ptr<const Pkcs11Module> live = it->second.lock();
    dlclose(library);  // The loaded instance holds a reference of its own.
    if (live) return live;
    registry.cv.wait(lock);  // Being finalised: start afresh once it is gone.
  }

  auto get_function_list =
      reinterpret_cast<CK_C_GetFunctionList>(dlsym(library, "C_GetFunctionList"));
  CK_FUNCTION_LIST* api = nullptr;
  CK_RV rv = get_function_list ? get_function_list(&api) : CKR_FUNCTION_NOT_SUPPORTED;
  if (rv != CKR_OK || api == nullptr) {
    dlclose(library);
    return absl::NotFoundError("'" + path + "' is not a PKCS#11 module (no C_GetFunctionList)");
  }
  // The module may create its own threads and use OS locks: we call it from many threads.
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  rv = api->C_Initialize(&args);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    dlclose(library);
    return CkError("C_Initialize", rv);
  }
  std::shared_ptr<const Pkcs11Module> module =
      absl::WrapUnique(new Pkcs11Module(path, library, api, /*finalize=*/rv == CKR_OK));
  registry.loaded[library] = module;
  return module;
}

absl::Status Pkcs11Module::Reinitialize() const {
  if (!finalize_) {
    return absl::UnavailableError("PKCS#11 module " + path_ +
                                  " was initialised by someone else in this process; not "
                                  "re-initialising it");
  }
  std::lock_guard lock(GetRegistry().mu);
  // Not initialised (an earlier C_Initialize failed) is as good as finalised.
  const CK_RV finalized = api_->C_Finalize(nullptr);
  if (finalized != CKR_OK && finalized != CKR_CRYPTOKI_NOT_INITIALIZED) {
    return CkError("C_Finalize", finalized);
  }
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  const CK_RV rv = api_->C_Initialize(&args);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) return CkError("C_Initialize", rv);
  return absl::OkStatus();
}

absl::StatusOr<CK_SLOT_ID> Pkcs11Module::FindSlot(std::string_view token_label) const {
  if (token_label.size() > kTokenLabelBytes) {
    return absl::NotFoundError("token label '" + std::string(token_label) +
                               "' is longer than 32 bytes");
  }
  std::vector<CK_SLOT_ID> slots;
  CK_RV rv;
  do {  // The slot list may grow between the two calls (hot-plugged readers).
    CK_ULONG count = 0;
    rv = api_->C_GetSlotList(CK_TRUE, nullptr, &count);
    if (rv != CKR_OK) return CkError("C_GetSlotList", rv);
    slots.resize(count);
    rv = api_->C_GetSlotList(CK_TRUE, slots.data(), &count);
    slots.resize(count);
  } while (rv == CKR_BUFFER_TOO_SMALL);
  if (rv != CKR_OK) return CkError("C_GetSlotList", rv);

  const std::string wanted = PadLabel(token_label);
  std::vector<CK_SLOT_ID> matches;
  for (CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    if (api_->C_GetTokenInfo(slot, &info) != CKR_OK) continue;  // Token left meanwhile.
    if (!(info.flags & CKF_TOKEN_INITIALIZED)) continue;
    if (std::string_view(reinterpret_cast<const char*>(info.label), kTokenLabelBytes) == wanted) {
      matches.push_back(slot);
    }
  }
  if (matches.empty()) {
    return absl::NotFoundError("no PKCS#11 token labelled '" + std::string(token_label) +
                               "' in module " + path_);
  }
  if (matches.size() > 1) {
    return absl::FailedPreconditionError("several PKCS#11 tokens are labelled '" +
                                         std::string(token_label) + "'");
  }
  return matches.front();
}

}  // namespace custos::hsm
