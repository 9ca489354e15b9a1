// custos_fault_pkcs11: a PKCS#11 v2.40 module that forwards every call to a real module and
// fails or hangs on command.
//
// Tests inject HSM faults into the real custosd (or into an Hsm opened with OpenPkcs11Hsm) by
// giving it this library as its hsm.module: custosd runs unchanged, on a real SoftHSM2 token,
// while a test decides from outside which C_* call returns which error, or stalls, and when.
// The function list handed out has all 68 v2.40 entry points; each one first applies the rules
// of the control file, then calls the real module's entry point with the same arguments.
//
// Environment:
//   CUSTOS_FAULT_REAL_MODULE  the real module, default /usr/lib/softhsm/libsofthsm2.so. Loaded
//                             on the first C_GetFunctionList or C_Initialize and kept for the
//                             life of the process (like any PKCS#11 module, it is one
//                             process-wide state).
//   CUSTOS_FAULT_CONTROL      the control file; a missing file means no rules.
//   CUSTOS_FAULT_LOG          optional: a file to which one line is appended per event.
// The last two are read at the first call and again at every C_Initialize, so that each
// initialisation of the module (a new Hsm in a test) can use files of its own.
//
// Control file: one rule per line; blank lines and lines starting with '#' are skipped.
//   <C_FunctionName> <action> [after=N] [times=M]
//     C_FunctionName  a v2.40 function, or '*' for every function except C_GetFunctionList,
//                     C_Initialize and C_Finalize.
//     action          'hang': the call blocks, before reaching the real module, until the
//                     control file no longer has this rule (same words, same options); then it
//                     goes through normally. Otherwise a CK_RV to return instead of calling the
//                     real module: a name (CKR_DEVICE_ERROR, CKR_SESSION_HANDLE_INVALID, ... see
//                     kCkrNames) or a number (0x30, 48).
//     after=N         let the first N calls the rule matches through; fire from call N + 1.
//     times=M         fire at most M times (default: no limit).
//   e.g. "C_Encrypt CKR_DEVICE_ERROR after=3 times=1" fails the 4th C_Encrypt, once.
// Where several rules match a call, each counts it and the first one (in file order) that may
// fire does. Counts start from zero whenever the file changes (not when the module is merely
// initialised again with the same control file): it is checked (stat: inode, size,
// mtime in ns) on every call, so writers should replace it atomically (write a temporary file,
// rename it over the control file), which also guarantees a new inode. Malformed lines are
// ignored, with an "ignored" line in the log and on stderr.
//
// Log lines: "fired <C_Function> <action>" when a rule fires, "hanging <C_Function>" when a
// hang starts, "released <C_Function>" when it ends, "ignored <line>" for a malformed rule.
// Each is appended with a single write(2) on an O_APPEND descriptor, so a test can poll the
// file, for instance for "hanging C_Encrypt", to know that a call is stuck.
//
// Thread-safe: one mutex guards the rules and the log, and is never held while calling the real
// module or while a call hangs, so other threads keep being served meanwhile.
#include <dlfcn.h>
#include <fcntl.h>
#include <p11-kit/pkcs11.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

// The v2.40 functions other than C_GetFunctionList, in CK_FUNCTION_LIST order:
// X(name, parameter list, argument list). Each becomes a wrapper Shim_<name>.
// clang-format off
#define CUSTOS_FAULT_FUNCTIONS(X)                                                               \
  X(C_Initialize, (CK_VOID_PTR init_args), (init_args))                                        \
  X(C_Finalize, (CK_VOID_PTR reserved), (reserved))                                            \
  X(C_GetInfo, (CK_INFO_PTR info), (info))                                                     \
  X(C_GetSlotList, (CK_BBOOL token_present, CK_SLOT_ID_PTR slots, CK_ULONG_PTR count),         \
    (token_present, slots, count))                                                             \
  X(C_GetSlotInfo, (CK_SLOT_ID slot, CK_SLOT_INFO_PTR info), (slot, info))                     \
  X(C_GetTokenInfo, (CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info), (slot, info))                   \
  X(C_GetMechanismList, (CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR types, CK_ULONG_PTR count),    \
    (slot, types, count))                                                                      \
  X(C_GetMechanismInfo, (CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info), \
    (slot, type, info))                                                                        \
  X(C_InitToken, (CK_SLOT_ID slot, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len,                      \
    CK_UTF8CHAR_PTR label), (slot, pin, pin_len, label))                                       \
  X(C_InitPIN, (CK_SESSION_HANDLE s, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len), (s, pin, pin_len)) \
  X(C_SetPIN, (CK_SESSION_HANDLE s, CK_UTF8CHAR_PTR old_pin, CK_ULONG old_len,                 \
    CK_UTF8CHAR_PTR new_pin, CK_ULONG new_len), (s, old_pin, old_len, new_pin, new_len))       \
  X(C_OpenSession, (CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,        \
    CK_SESSION_HANDLE_PTR s), (slot, flags, app, notify, s))                                   \
  X(C_CloseSession, (CK_SESSION_HANDLE s), (s))                                                \
  X(C_CloseAllSessions, (CK_SLOT_ID slot), (slot))                                             \
  X(C_GetSessionInfo, (CK_SESSION_HANDLE s, CK_SESSION_INFO_PTR info), (s, info))              \
  X(C_GetOperationState, (CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG_PTR state_len),     \
    (s, state, state_len))                                                                     \
  X(C_SetOperationState, (CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG state_len,          \
    CK_OBJECT_HANDLE encryption_key, CK_OBJECT_HANDLE authentication_key),                     \
    (s, state, state_len, encryption_key, authentication_key))                                 \
  X(C_Login, (CK_SESSION_HANDLE s, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len),  \
    (s, user, pin, pin_len))                                                                   \
  X(C_Logout, (CK_SESSION_HANDLE s), (s))                                                      \
  X(C_CreateObject, (CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR templ, CK_ULONG count,              \
    CK_OBJECT_HANDLE_PTR object), (s, templ, count, object))                                   \
  X(C_CopyObject, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR templ,       \
    CK_ULONG count, CK_OBJECT_HANDLE_PTR copy), (s, object, templ, count, copy))               \
  X(C_DestroyObject, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object), (s, object))              \
  X(C_GetObjectSize, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object, CK_ULONG_PTR size),        \
    (s, object, size))                                                                         \
  X(C_GetAttributeValue, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object,                        \
    CK_ATTRIBUTE_PTR templ, CK_ULONG count), (s, object, templ, count))                        \
  X(C_SetAttributeValue, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object,                        \
    CK_ATTRIBUTE_PTR templ, CK_ULONG count), (s, object, templ, count))                        \
  X(C_FindObjectsInit, (CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR templ, CK_ULONG count),          \
    (s, templ, count))                                                                         \
  X(C_FindObjects, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE_PTR objects, CK_ULONG max_count,     \
    CK_ULONG_PTR count), (s, objects, max_count, count))                                       \
  X(C_FindObjectsFinal, (CK_SESSION_HANDLE s), (s))                                            \
  X(C_EncryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),    \
    (s, mechanism, key))                                                                       \
  X(C_Encrypt, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,         \
    CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                                      \
  X(C_EncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,   \
    CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                                      \
  X(C_EncryptFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len),              \
    (s, out, out_len))                                                                         \
  X(C_DecryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),    \
    (s, mechanism, key))                                                                       \
  X(C_Decrypt, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,         \
    CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                                      \
  X(C_DecryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,   \
    CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                                      \
  X(C_DecryptFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len),              \
    (s, out, out_len))                                                                         \
  X(C_DigestInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism), (s, mechanism))           \
  X(C_Digest, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,          \
    CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                                      \
  X(C_DigestUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len))   \
  X(C_DigestKey, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key), (s, key))                        \
  X(C_DigestFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len),               \
    (s, out, out_len))                                                                         \
  X(C_SignInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),       \
    (s, mechanism, key))                                                                       \
  X(C_Sign, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,            \
    CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                                      \
  X(C_SignUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len))     \
  X(C_SignFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len),                 \
    (s, out, out_len))                                                                         \
  X(C_SignRecoverInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism,                       \
    CK_OBJECT_HANDLE key), (s, mechanism, key))                                                \
  X(C_SignRecover, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,     \
    CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                                      \
  X(C_VerifyInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key),     \
    (s, mechanism, key))                                                                       \
  X(C_Verify, (CK_SESSION_HANDLE s, CK_BYTE_PTR data, CK_ULONG data_len,                       \
    CK_BYTE_PTR signature, CK_ULONG signature_len), (s, data, data_len, signature,             \
    signature_len))                                                                            \
  X(C_VerifyUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len))   \
  X(C_VerifyFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR signature, CK_ULONG signature_len),       \
    (s, signature, signature_len))                                                             \
  X(C_VerifyRecoverInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism,                     \
    CK_OBJECT_HANDLE key), (s, mechanism, key))                                                \
  X(C_VerifyRecover, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,   \
    CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                                      \
  X(C_DigestEncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,              \
    CK_BYTE_PTR out, CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                     \
  X(C_DecryptDigestUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,              \
    CK_BYTE_PTR out, CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                     \
  X(C_SignEncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,                \
    CK_BYTE_PTR out, CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                     \
  X(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,              \
    CK_BYTE_PTR out, CK_ULONG_PTR out_len), (s, in, in_len, out, out_len))                     \
  X(C_GenerateKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism, CK_ATTRIBUTE_PTR templ,   \
    CK_ULONG count, CK_OBJECT_HANDLE_PTR key), (s, mechanism, templ, count, key))              \
  X(C_GenerateKeyPair, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism,                       \
    CK_ATTRIBUTE_PTR public_templ, CK_ULONG public_count, CK_ATTRIBUTE_PTR private_templ,      \
    CK_ULONG private_count, CK_OBJECT_HANDLE_PTR public_key,                                   \
    CK_OBJECT_HANDLE_PTR private_key), (s, mechanism, public_templ, public_count,              \
    private_templ, private_count, public_key, private_key))                                    \
  X(C_WrapKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism,                               \
    CK_OBJECT_HANDLE wrapping_key, CK_OBJECT_HANDLE key, CK_BYTE_PTR wrapped,                  \
    CK_ULONG_PTR wrapped_len),                                                                 \
    (s, mechanism, wrapping_key, key, wrapped, wrapped_len))                                   \
  X(C_UnwrapKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism,                             \
    CK_OBJECT_HANDLE unwrapping_key, CK_BYTE_PTR wrapped, CK_ULONG wrapped_len,                \
    CK_ATTRIBUTE_PTR templ, CK_ULONG count, CK_OBJECT_HANDLE_PTR key),                         \
    (s, mechanism, unwrapping_key, wrapped, wrapped_len, templ, count, key))                   \
  X(C_DeriveKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE base_key,  \
    CK_ATTRIBUTE_PTR templ, CK_ULONG count, CK_OBJECT_HANDLE_PTR key),                         \
    (s, mechanism, base_key, templ, count, key))                                               \
  X(C_SeedRandom, (CK_SESSION_HANDLE s, CK_BYTE_PTR seed, CK_ULONG seed_len),                  \
    (s, seed, seed_len))                                                                       \
  X(C_GenerateRandom, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG out_len),                \
    (s, out, out_len))                                                                         \
  X(C_GetFunctionStatus, (CK_SESSION_HANDLE s), (s))                                           \
  X(C_CancelFunction, (CK_SESSION_HANDLE s), (s))                                              \
  X(C_WaitForSlotEvent, (CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved),           \
    (flags, slot, reserved))
// clang-format on

// Function ids, for rules that name a function without comparing strings on every call.
// clang-format off
enum Function : int {
  kC_GetFunctionList,
#define CUSTOS_FAULT_ENUM(name, params, args) k##name,
  CUSTOS_FAULT_FUNCTIONS(CUSTOS_FAULT_ENUM)
#undef CUSTOS_FAULT_ENUM
  kFunctionCount,
};

constexpr const char* kFunctionNames[] = {
  "C_GetFunctionList",
#define CUSTOS_FAULT_NAME(name, params, args) #name,
  CUSTOS_FAULT_FUNCTIONS(CUSTOS_FAULT_NAME)
#undef CUSTOS_FAULT_NAME
};
// clang-format on

// A function left out fails the count; one listed twice fails to compile (two Shim_ wrappers).
static_assert(kFunctionCount == 68, "PKCS#11 v2.40 has 68 functions");
static_assert(sizeof(kFunctionNames) / sizeof(kFunctionNames[0]) == kFunctionCount);
static_assert(sizeof(CK_FUNCTION_LIST) ==
              offsetof(CK_FUNCTION_LIST, C_Initialize) + kFunctionCount * sizeof(CK_C_Initialize));

constexpr char kDefaultRealModule[] = "/usr/lib/softhsm/libsofthsm2.so";
constexpr auto kHangPoll = std::chrono::milliseconds(10);

// Error names a rule may use instead of a number.
#define CUSTOS_FAULT_CKR(name) \
  { #name, name }
constexpr std::pair<std::string_view, CK_RV> kCkrNames[] = {
    CUSTOS_FAULT_CKR(CKR_OK),
    CUSTOS_FAULT_CKR(CKR_HOST_MEMORY),
    CUSTOS_FAULT_CKR(CKR_SLOT_ID_INVALID),
    CUSTOS_FAULT_CKR(CKR_GENERAL_ERROR),
    CUSTOS_FAULT_CKR(CKR_FUNCTION_FAILED),
    CUSTOS_FAULT_CKR(CKR_ARGUMENTS_BAD),
    CUSTOS_FAULT_CKR(CKR_DATA_INVALID),
    CUSTOS_FAULT_CKR(CKR_DATA_LEN_RANGE),
    CUSTOS_FAULT_CKR(CKR_DEVICE_ERROR),
    CUSTOS_FAULT_CKR(CKR_DEVICE_MEMORY),
    CUSTOS_FAULT_CKR(CKR_DEVICE_REMOVED),
    CUSTOS_FAULT_CKR(CKR_ENCRYPTED_DATA_INVALID),
    CUSTOS_FAULT_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE),
    CUSTOS_FAULT_CKR(CKR_FUNCTION_CANCELED),
    CUSTOS_FAULT_CKR(CKR_FUNCTION_NOT_SUPPORTED),
    CUSTOS_FAULT_CKR(CKR_KEY_HANDLE_INVALID),
    CUSTOS_FAULT_CKR(CKR_MECHANISM_INVALID),
    CUSTOS_FAULT_CKR(CKR_OBJECT_HANDLE_INVALID),
    CUSTOS_FAULT_CKR(CKR_OPERATION_ACTIVE),
    CUSTOS_FAULT_CKR(CKR_OPERATION_NOT_INITIALIZED),
    CUSTOS_FAULT_CKR(CKR_PIN_INCORRECT),
    CUSTOS_FAULT_CKR(CKR_PIN_LOCKED),
    CUSTOS_FAULT_CKR(CKR_PIN_EXPIRED),
    CUSTOS_FAULT_CKR(CKR_SESSION_CLOSED),
    CUSTOS_FAULT_CKR(CKR_SESSION_COUNT),
    CUSTOS_FAULT_CKR(CKR_SESSION_HANDLE_INVALID),
    CUSTOS_FAULT_CKR(CKR_TOKEN_NOT_PRESENT),
    CUSTOS_FAULT_CKR(CKR_TOKEN_NOT_RECOGNIZED),
    CUSTOS_FAULT_CKR(CKR_USER_NOT_LOGGED_IN),
    CUSTOS_FAULT_CKR(CKR_WRAPPED_KEY_INVALID),
    CUSTOS_FAULT_CKR(CKR_WRAPPING_KEY_HANDLE_INVALID),
    CUSTOS_FAULT_CKR(CKR_UNWRAPPING_KEY_HANDLE_INVALID),
    CUSTOS_FAULT_CKR(CKR_BUFFER_TOO_SMALL),
    CUSTOS_FAULT_CKR(CKR_CRYPTOKI_NOT_INITIALIZED),
};
#undef CUSTOS_FAULT_CKR

struct Rule {
  int function;        // A Function, or kAnyFunction for '*'.
  std::string action;  // As written, for the log.
  bool hang = false;
  CK_RV rv = CKR_OK;
  uint64_t after = 0;
  uint64_t times = std::numeric_limits<uint64_t>::max();
  std::string text;   // The rule's words joined by single spaces: what a hang waits to vanish.
  uint64_t seen = 0;  // Calls matched since this version of the file was loaded.
  uint64_t fired = 0;
};

constexpr int kAnyFunction = -1;

// What identifies one version of the control file. A rename over it brings a new inode; the
// size and the mtime in nanoseconds catch a file rewritten in place.
struct FileVersion {
  bool exists = false;
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  timespec mtime{};

  static FileVersion Of(const struct stat& st) {
    return {true, st.st_dev, st.st_ino, st.st_size, st.st_mtim};
  }
  bool operator==(const FileVersion& o) const {
    return exists == o.exists && dev == o.dev && ino == o.ino && size == o.size &&
           mtime.tv_sec == o.mtime.tv_sec && mtime.tv_nsec == o.mtime.tv_nsec;
  }
};

bool ParseNumber(std::string_view text, int base, uint64_t* value) {
  if (text.empty() || !(text[0] >= '0' && text[0] <= '9')) return false;
  const std::string copy(text);
  char* end = nullptr;
  errno = 0;
  *value = std::strtoull(copy.c_str(), &end, base);
  return errno == 0 && end == copy.c_str() + copy.size();
}

std::optional<int> ParseFunction(std::string_view name) {
  if (name == "*") return kAnyFunction;
  for (int f = 0; f < kFunctionCount; ++f) {
    if (name == kFunctionNames[f]) return f;
  }
  return std::nullopt;
}

// One control line (already known not to be blank or a comment), or nullopt if malformed.
std::optional<Rule> ParseRule(std::string_view line) {
  std::istringstream in{std::string(line)};
  std::vector<std::string> words;
  for (std::string word; in >> word;) words.push_back(word);
  if (words.size() < 2) return std::nullopt;

  Rule rule;
  std::optional<int> function = ParseFunction(words[0]);
  if (!function) return std::nullopt;
  rule.function = *function;
  rule.action = words[1];
  if (rule.action == "hang") {
    rule.hang = true;
  } else {
    bool known = false;
    for (const auto& [name, rv] : kCkrNames) {
      if (rule.action == name) {
        rule.rv = rv;
        known = true;
      }
    }
    uint64_t number = 0;
    if (!known && !ParseNumber(rule.action, 0, &number)) return std::nullopt;
    if (!known) rule.rv = static_cast<CK_RV>(number);
  }
  for (size_t i = 2; i < words.size(); ++i) {
    std::string_view word = words[i];
    uint64_t* option = nullptr;
    if (word.substr(0, 6) == "after=") {
      option = &rule.after;
    } else if (word.substr(0, 6) == "times=") {
      option = &rule.times;
    } else {
      return std::nullopt;
    }
    if (!ParseNumber(word.substr(6), 10, option)) return std::nullopt;
  }
  for (const std::string& word : words) rule.text += (rule.text.empty() ? "" : " ") + word;
  return rule;
}

// All mutable state of the shim. Leaked on purpose: a call may still be in flight (hanging, in
// a thread the test abandoned) while the process runs its static destructors.
class State {
 public:
  // Decides the fate of one call to `function`: nullopt to forward it, or the CK_RV to return.
  // Blocks while a 'hang' rule holds the call.
  std::optional<CK_RV> Apply(Function function) {
    std::string hang;
    {
      std::lock_guard lock(mu_);
      // A new initialisation (a new Hsm in a test) may come with files of its own.
      if (!configured_ || function == kC_Initialize) ConfigureLocked();
      ReloadIfChangedLocked();
      Rule* rule = MatchLocked(function);
      if (rule == nullptr) return std::nullopt;
      ++rule->fired;
      LogLocked("fired " + std::string(kFunctionNames[function]) + " " + rule->action);
      if (!rule->hang) return rule->rv;
      LogLocked("hanging " + std::string(kFunctionNames[function]));
      hang = rule->text;
    }
    // Polled rather than watched (inotify): cheap enough for tests, and it works whatever the
    // file system.
    for (;;) {
      std::this_thread::sleep_for(kHangPoll);
      std::lock_guard lock(mu_);
      ReloadIfChangedLocked();
      if (!HasRuleLocked(hang)) {
        LogLocked("released " + std::string(kFunctionNames[function]));
        return std::nullopt;
      }
    }
  }

 private:
  void ConfigureLocked() {
    configured_ = true;
    const char* control = std::getenv("CUSTOS_FAULT_CONTROL");
    const std::string path = control ? control : "";
    // Another file: read its rules afresh. The same file (a module re-initialised by the code
    // under test) keeps its rules' counts, so that "times=1" still means once.
    if (path != control_path_) loaded_ = false;
    control_path_ = path;
    // Reopened even if the name is the same: the file may have been removed meanwhile.
    if (log_fd_ >= 0) close(log_fd_);
    const char* log = std::getenv("CUSTOS_FAULT_LOG");
    log_fd_ = log && *log ? open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644) : -1;
  }

  void ReloadIfChangedLocked() {
    FileVersion now;
    struct stat st;
    if (!control_path_.empty() && stat(control_path_.c_str(), &st) == 0) {
      now = FileVersion::Of(st);
    }
    if (loaded_ && now == version_) return;

    // The version recorded is that of the file actually read (fstat of the open descriptor),
    // so that a replacement racing with this read is noticed on the next call.
    loaded_ = true;
    version_ = FileVersion();
    rules_.clear();
    const int fd = control_path_.empty() ? -1 : open(control_path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    std::string text;
    if (fstat(fd, &st) == 0) version_ = FileVersion::Of(st);
    char buffer[4096];
    for (ssize_t n; (n = read(fd, buffer, sizeof buffer)) != 0;) {
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) break;
      text.append(buffer, n);
    }
    close(fd);

    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
      const size_t start = line.find_first_not_of(" \t\r");
      if (start == std::string::npos || line[start] == '#') continue;
      if (std::optional<Rule> rule = ParseRule(line)) {
        rules_.push_back(std::move(*rule));
      } else {
        const size_t end = line.find_last_not_of(" \t\r");
        const std::string bad = line.substr(start, end - start + 1);
        LogLocked("ignored " + bad);
        std::fprintf(stderr, "custos_fault_pkcs11: ignoring malformed rule in %s: %s\n",
                     control_path_.c_str(), bad.c_str());
      }
    }
  }

  // Every matching rule counts the call; the first that may fire takes it.
  Rule* MatchLocked(Function function) {
    const bool wildcard =
        function != kC_GetFunctionList && function != kC_Initialize && function != kC_Finalize;
    Rule* chosen = nullptr;
    for (Rule& rule : rules_) {
      if (rule.function == kAnyFunction ? !wildcard : rule.function != function) continue;
      ++rule.seen;
      if (chosen == nullptr && rule.seen > rule.after && rule.fired < rule.times) chosen = &rule;
    }
    return chosen;
  }

  bool HasRuleLocked(const std::string& text) const {
    for (const Rule& rule : rules_) {
      if (rule.text == text) return true;
    }
    return false;
  }

  // One write(2) per line on an O_APPEND descriptor: readers never see half a line.
  void LogLocked(std::string line) {
    if (log_fd_ < 0) return;
    line += '\n';
    ssize_t ignored = write(log_fd_, line.data(), line.size());
    (void)ignored;
  }

  std::mutex mu_;  // Guards everything below.
  bool configured_ = false;
  std::string control_path_;
  int log_fd_ = -1;
  bool loaded_ = false;  // rules_ reflect version_ of control_path_.
  FileVersion version_;
  std::vector<Rule> rules_;
};

State& GetState() {
  static State& state = *new State;
  return state;
}

// The real module's function list, set once it is loaded and never unloaded: its state is
// process-wide, and a call may still be in flight when ours is dlclose'd.
std::atomic<CK_FUNCTION_LIST*> real_api{nullptr};
CK_FUNCTION_LIST shim_api{};

CK_FUNCTION_LIST* Real() { return real_api.load(std::memory_order_acquire); }

#define CUSTOS_FAULT_WRAPPER(name, params, args)                         \
  CK_RV Shim_##name params {                                             \
    if (std::optional<CK_RV> rv = GetState().Apply(k##name)) return *rv; \
    return Real()->name args;                                            \
  }
CUSTOS_FAULT_FUNCTIONS(CUSTOS_FAULT_WRAPPER)
#undef CUSTOS_FAULT_WRAPPER

// Loads the real module and fills shim_api, once; false if the real module cannot be used.
bool LoadReal() {
  static std::mutex mu;
  std::lock_guard lock(mu);
  if (Real() != nullptr) return true;
  const char* env = std::getenv("CUSTOS_FAULT_REAL_MODULE");
  const std::string path = env && *env ? env : kDefaultRealModule;
  void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* why = dlerror();
    std::fprintf(stderr, "custos_fault_pkcs11: cannot load real module %s: %s\n", path.c_str(),
                 why ? why : "unknown error");
    return false;
  }
  auto get_function_list =
      reinterpret_cast<CK_C_GetFunctionList>(dlsym(library, "C_GetFunctionList"));
  CK_FUNCTION_LIST* api = nullptr;
  if (get_function_list == nullptr || get_function_list(&api) != CKR_OK || api == nullptr) {
    std::fprintf(stderr, "custos_fault_pkcs11: %s is not a PKCS#11 module\n", path.c_str());
    dlclose(library);
    return false;
  }
  shim_api.version = api->version;
#define CUSTOS_FAULT_SLOT(name, params, args) shim_api.name = &Shim_##name;
  CUSTOS_FAULT_FUNCTIONS(CUSTOS_FAULT_SLOT)
#undef CUSTOS_FAULT_SLOT
  shim_api.C_GetFunctionList = &C_GetFunctionList;
  real_api.store(api, std::memory_order_release);
  return true;
}

}  // namespace

// The one exported symbol: what Pkcs11Module (and any PKCS#11 loader) looks up with dlsym.
extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(
    CK_FUNCTION_LIST_PTR_PTR function_list) {
  if (function_list == nullptr) return CKR_ARGUMENTS_BAD;
  if (!LoadReal()) return CKR_GENERAL_ERROR;
  if (std::optional<CK_RV> rv = GetState().Apply(kC_GetFunctionList)) return *rv;
  *function_list = &shim_api;
  return CKR_OK;
}
