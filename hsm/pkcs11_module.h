// Pkcs11Module: a PKCS#11 module loaded (dlopen) and initialised (C_Initialize) for this process.
//
// A module's initialised state is process-wide: a second C_Initialize fails with
// CKR_CRYPTOKI_ALREADY_INITIALIZED and one C_Finalize ends it for every user in the process.
// So Load() hands out one shared instance per library, and the last owner to let go runs
// C_Finalize and dlclose (the library stays mapped: it is opened RTLD_NODELETE). Several Hsm
// instances (tests, or custosd reopening after a fault) can therefore come and go
// independently. If something outside Custos initialised the module first, it is used but
// never finalised here.
//
// Thread-safe: the function list may be called from any thread (CKF_OS_LOCKING_OK).
#pragma once

#include <p11-kit/pkcs11.h>

#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"

namespace custos::hsm {

class Pkcs11Module {
 public:
  // Loads and initialises the module at `path` (a file, or a name dlopen searches for), or
  // returns the instance already loaded, whatever path it was loaded by.
  // NOT_FOUND if the library cannot be loaded or is not a PKCS#11 module; otherwise the
  // C_Initialize error.
  static absl::StatusOr<std::shared_ptr<const Pkcs11Module>> Load(const std::string& path);

  ~Pkcs11Module();

  // Neither copyable nor movable: an instance *is* the process-wide initialised state of the
  // module, so a copy would finalise it twice and a moved-from instance would leave the
  // registry of loaded modules pointing at an empty shell. Share it through the shared_ptr.
  Pkcs11Module(const Pkcs11Module&) = delete;
  Pkcs11Module& operator=(const Pkcs11Module&) = delete;

  // The module's C_* entry points; valid for the lifetime of this object.
  CK_FUNCTION_LIST* api() const { return api_; }

  const std::string& path() const { return path_; }

  // C_Finalize, then C_Initialize: the last rung of recovering from a module or token in a
  // bad state (slots are scanned and tokens loaded again). Every session of the process, and
  // every object those sessions made, is gone afterwards; no call may be under way meanwhile
  // (C_Finalize during a call is undefined), in this or any other user of the module in the
  // process. UNAVAILABLE if the module was initialised by someone else (not ours to finalise);
  // otherwise C_Finalize's or C_Initialize's error.
  absl::Status Reinitialize() const;

  // The slot holding the initialised token labelled `token_label` (labels are compared after
  // space-padding to 32 bytes, as tokens store them). NOT_FOUND if no token has that label;
  // FAILED_PRECONDITION if several do.
  absl::StatusOr<CK_SLOT_ID> FindSlot(std::string_view token_label) const;

 private:
  Pkcs11Module(std::string path, void* library, CK_FUNCTION_LIST* api, bool finalize);

  std::string path_;  // As given to Load(), for messages.
  void* library_;     // dlopen handle; also the registry key.
  CK_FUNCTION_LIST* api_;
  bool finalize_;  // False if someone else in the process ran C_Initialize first.
};

}  // namespace custos::hsm
