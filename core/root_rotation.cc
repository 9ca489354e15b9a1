// Root key rotation: a new root for new versions at once; versions under legacy roots moved
// to it in the background, page by page, with progress in GetRequest; retired roots destroyed
// once nothing they wrap is left. See docs/ARCHITECTURE.md, "Root key rotation".
#include <algorithm>
#include <map>
#include <set>

#include "absl/cleanup/cleanup.h"
#include "common/strings.h"
#include "core/call.h"
#include "core/kms.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"
#include "storage/row_codec.h"

namespace custos::core {
namespace {

using storage::KeyRecord;
using storage::RequestState;

// Keys read, re-wrapped outside any lock and committed together per step of the background
// work: what it holds in memory at once, and what a crash can make it redo.
constexpr size_t kMigrationPageKeys = 256;
constexpr std::chrono::milliseconds kFirstRetry{200};
constexpr std::chrono::milliseconds kLastRetry{30'000};
// How many labels taken by keys Custos did not make a rotation passes over before it gives up.
constexpr size_t kMaxSkippedRootLabels = 16;

// The next root label: "custos-root" -> "custos-root.2" -> "custos-root.3" ...
std::string NextRootLabel(const std::string& label) {
  const size_t dot = label.rfind('.');
  if (dot != std::string::npos && dot + 1 < label.size() && dot + 10 > label.size() &&
      label.find_first_not_of("0123456789", dot + 1) == std::string::npos) {
    return StrCat(label.substr(0, dot), ".", std::stoi(label.substr(dot + 1)) + 1);
  }
  return StrCat(label, ".2");
}

// Destroys root `label`, made by a rotation that then failed, unless the store names it as the
// root in use after all (a commit whose answer was lost) or cannot say. Left behind, it would
// only be passed over by the next attempt.
void DropUncommittedRoot(const storage::KeyStore& store, hsm::Hsm& hsm, const std::string& label) {
  // (Written by this very call, if at all: an absence is as good as the index says.)
  const absl::StatusOr<std::optional<std::string>> in_use =
      store.GetSetting(kRootKeySetting, storage::KeyStore::Absence::kHarmless);
  if (!in_use.ok() || in_use->value_or("") == label) return;
  if (absl::Status destroyed = hsm.DestroyRootKey(label); !destroyed.ok()) {
    spdlog::warn("root key '{}', made for a root rotation that failed, is left on the token: {}",
                 label, std::string(destroyed.message()));
  }
}

// What kRootMigrationSetting holds: the rotation whose versions are still being moved.
struct Migration {
  std::string request;
  std::string from;      // the root the rotation retired
  std::string to;        // the root it put in use, which the versions move to
  uint64_t to_move = 0;  // versions under legacy roots when it was approved
  uint64_t kept = 0;     // versions under confining roots, which stay where they are

  std::string Encode() const {
    return nlohmann::json{
        {"request", request}, {"from", from}, {"to", to}, {"to_move", to_move}, {"kept", kept}}
        .dump();
  }
  static absl::StatusOr<Migration> Decode(const std::string& text) {
    const nlohmann::json json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    Migration m;
    if (!json.is_object() || !json.contains("request") || !json["request"].is_string() ||
        !json.contains("from") || !json["from"].is_string() || !json.contains("to") ||
        !json["to"].is_string() || !json.contains("to_move") ||
        !json["to_move"].is_number_unsigned() || !json.contains("kept") ||
        !json["kept"].is_number_unsigned()) {
      return absl::InternalError("the stored root migration is not one this server wrote");
    }
    m.request = json["request"].get<std::string>();
    m.from = json["from"].get<std::string>();
    m.to = json["to"].get<std::string>();
    m.to_move = json["to_move"].get<uint64_t>();
    m.kept = json["kept"].get<uint64_t>();
    return m;
  }
  std::string Head() const { return StrCat("root key rotated from '", from, "' to '", to, "'"); }
  // The request's reason once nothing is left to move.
  std::string Done(uint64_t left) const {
    return StrCat(Head(), "; ", to_move - std::min(left, to_move),
                  " key versions re-wrapped from legacy roots; ", kept,
                  " stay under the confining roots that wrapped them",
                  left == 0 ? std::string()
                            : StrCat("; ", left,
                                     " could not be re-wrapped (see their RewrapKeyVersions "
                                     "records) and keep their legacy root"));
  }
};

// Versions under roots other than `to` that do not confine what they unwrap (those that can
// and must move), asking the HSM once per root.
absl::StatusOr<uint64_t> LegacyVersions(hsm::Hsm& hsm, storage::KeyStore& store,
                                        const std::string& to,
                                        std::map<std::string, bool>& confines) {
  CUSTOS_ASSIGN_OR_RETURN(const auto by_root, store.CountVersionsByRoot());
  uint64_t legacy = 0;
  for (const auto& [label, count] : by_root) {
    if (label == to) continue;
    auto known = confines.find(label);
    if (known == confines.end()) {
      CUSTOS_ASSIGN_OR_RETURN(const bool confining, hsm.RootKeyConfinesVersions(label));
      known = confines.emplace(label, confining).first;
    }
    if (!known->second) legacy += count;
  }
  return legacy;
}

}  // namespace

Kms::~Kms() { StopBackgroundWork(); }

void Kms::StopBackgroundWork() {
  std::thread running;
  {
    std::lock_guard lock(migration_mu_);
    migration_stopping_ = true;
    running = std::move(migration_thread_);
  }
  migration_cv_.notify_all();
  if (running.joinable()) running.join();
}

bool Kms::MigrationPause(std::chrono::milliseconds delay) {
  std::unique_lock lock(migration_mu_);
  return !migration_cv_.wait_for(lock, delay, [this] { return migration_stopping_; });
}

absl::Status Kms::NoRootMigrationRunning() const {
  // Believed absent without a walk of the log: a rotation let through by a migration setting
  // deleted outside Custos counts the versions under every legacy root afresh, those the
  // lost migration had yet to move included.
  CUSTOS_ASSIGN_OR_RETURN(
      const std::optional<std::string> running,
      options_.store->GetSetting(kRootMigrationSetting, storage::KeyStore::Absence::kHarmless));
  if (running.has_value() && !running->empty()) {
    return absl::FailedPreconditionError(
        "the last root rotation is still re-wrapping key versions off legacy roots (GetRequest "
        "shows its progress); the next one waits until it is done");
  }
  return absl::OkStatus();
}

absl::StatusOr<Request> Kms::RotateRoot(Call& call, Request request) {
  Migration migration;
  migration.request = request.id;
  CUSTOS_ASSIGN_OR_RETURN(migration.from, RootForNewVersions());
  CUSTOS_RETURN_IF_ERROR(NoRootMigrationRunning());
  // Roots retired earlier that nothing depends on any more go first. One the HSM will not
  // destroy (the attempt recorded) does not hold up the rotation: it stays on the list.
  if (absl::Status destroyed = DestroyRetiredRoots(request.id); !destroyed.ok()) {
    spdlog::warn("root rotation {}: a retired root is not destroyed yet: {}", request.id,
                 destroyed.ToString());
  }
  migration.to = NextRootLabel(migration.from);
  CUSTOS_ASSIGN_OR_RETURN(const auto by_root, options_.store->CountVersionsByRoot());
  // Written back with the new root added: an earlier list taken for absent would be lost.
  CUSTOS_ASSIGN_OR_RETURN(const std::vector<std::string> already_retired,
                          RetiredRoots(storage::KeyStore::Absence::kProven));
  // The new root is always one this call generates, under a label the store does not know.
  // A key already under the next label was left by an attempt cut short, made by this server
  // for a newer copy of the database, or made outside Custos. Adopting it could mean wrapping
  // every version under a key that cannot wrap (SoftHSM2 stores a generated key's value after
  // its other attributes: a kill in between leaves a labelled key with no value) or whose value
  // someone knows (imported by a PIN holder). Destroying it could shred what a newer copy of
  // the database wraps under it. So it is left alone, and the next free label is used.
  std::vector<std::string> skipped;
  for (;;) {
    const bool known = by_root.count(migration.to) > 0 ||
                       std::find(already_retired.begin(), already_retired.end(), migration.to) !=
                           already_retired.end();
    absl::Status created = known ? absl::AlreadyExistsError("named by the key database")
                                 : options_.hsm->CreateRootKey(migration.to);
    if (created.ok()) break;
    if (!absl::IsAlreadyExists(created)) return created;
    if (skipped.size() == kMaxSkippedRootLabels) {
      return absl::FailedPreconditionError(StrCat(
          "the HSM token or the key database already has keys labelled '", skipped.front(),
          "' to '", migration.to,
          "', which a root rotation does not reuse; remove those of them that no copy of the "
          "database needs (docs/OPERATIONS.md, \"Day to day\") and approve again"));
    }
    spdlog::warn(
        "root rotation {}: the label '{}' is taken ({}) by a key this rotation did not make (left "
        "by an attempt cut short, made for a newer copy of the database, or made outside "
        "Custos); it is left alone and not used",
        request.id, migration.to, std::string(created.message()));
    skipped.push_back(migration.to);
    migration.to = NextRootLabel(migration.to);
  }
  // Made here, so destroyed again if the rotation fails before it is committed (the next
  // attempt would only pass over it), unless the store names it after all.
  bool committed = false;
  absl::Cleanup drop_new_root = [&] {
    if (committed) return;
    DropUncommittedRoot(*options_.store, *options_.hsm, migration.to);
    std::lock_guard lock(policy_mu_);
    root_proven_ = false;  // a commit reported failed may have been made: read the store again
  };
  // Versions under a legacy root (one that does not confine what it unwraps) move to the new
  // root, inside the HSM, in the background. Versions under a confining root cannot move, by
  // design: they stay under it, and it is destroyed once the last of them is
  // (DestroyRetiredRoots).
  std::set<std::string> retired = {migration.from};
  retired.insert(already_retired.begin(), already_retired.end());
  std::set<std::string> unknown;  // roots this server did not put in use that rows name
  for (const auto& [label, count] : by_root) {
    if (retired.count(label) == 0) unknown.insert(label);
    CUSTOS_ASSIGN_OR_RETURN(const bool confining, options_.hsm->RootKeyConfinesVersions(label));
    (confining ? migration.kept : migration.to_move) += count;
  }
  // Such a root (a configured label changed, or a version row edited with SQL to name another
  // key on the token) is retired, to be destroyed once nothing is wrapped under it, only if
  // checked key rows have versions under it.
  if (!unknown.empty()) {
    CUSTOS_ASSIGN_OR_RETURN(const auto checked, CheckedRootUse(unknown));
    for (const std::string& label : unknown) {
      if (checked.has_value() && checked->at(label) > 0) {
        retired.insert(label);
      } else {
        spdlog::error(
            "root rotation {}: key '{}' is not retired: no checked key row has a version under "
            "it{}",
            request.id, label, checked.has_value() ? "" : " (a key's row failed its check)");
      }
    }
  }

  request.state = RequestState::kExecuted;
  request.closed_at = options_.clock->NowSeconds();
  request.reason =
      migration.to_move == 0
          ? migration.Done(0)
          : StrCat(migration.Head(), "; ", migration.to_move,
                   " key versions under legacy roots are being re-wrapped under it "
                   "in the background; ",
                   migration.kept, " stay under the confining roots that wrapped them");
  storage::WriteBatch batch;
  batch.requests.push_back(request);
  batch.settings[kRootKeySetting] = migration.to;
  // Remembered durably, so that their destruction is retried after a failure or a crash.
  batch.settings[kRetiredRootsSetting] = nlohmann::json(retired).dump();
  audit::Event rotated =
      ServerEvent("RotateRootKey", "", request.id, absl::StatusCode::kOk,
                  StrCat("new root ", migration.to, "; ", migration.to_move,
                         " versions to re-wrap, ", migration.kept, " kept",
                         skipped.empty() ? "" : "; labels passed over, taken already: ",
                         skipped.empty() ? "" : nlohmann::json(skipped).dump()));
  rotated.row = storage::SettingRowName(kRootKeySetting);
  audit::Event retire = ServerEvent("RetireRootKeys", "", request.id, absl::StatusCode::kOk,
                                    StrCat("retired: ", nlohmann::json(retired).dump()));
  retire.row = storage::SettingRowName(kRetiredRootsSetting);
  std::vector<audit::Event> events = {std::move(rotated), std::move(retire)};
  if (migration.to_move > 0) {  // remembered durably, so that a restart resumes it
    batch.settings[kRootMigrationSetting] = migration.Encode();
    audit::Event started =
        ServerEvent("RootMigrationStarted", "", request.id, absl::StatusCode::kOk,
                    StrCat(migration.to_move, " versions to re-wrap under ", migration.to));
    started.row = storage::SettingRowName(kRootMigrationSetting);
    events.push_back(std::move(started));
  }
  call.event().row = storage::RequestRowName(request.id);
  CUSTOS_RETURN_IF_ERROR(
      call.CommitWith(std::move(batch), absl::StatusCode::kOk, std::move(events)));
  committed = true;
  {
    std::lock_guard lock(policy_mu_);
    root_key_label_ = migration.to;
    root_proven_ = true;  // as committed with this call's record
  }
  if (migration.to_move > 0) {
    // Once started it outlives this call; a failure to start now is retried by maintenance.
    (void)ResumeRootMigration();
    return WithProgress(std::move(request));
  }
  // The rotation is done; roots that still wrap versions, or cannot be destroyed now, are left
  // to maintenance.
  (void)DestroyRetiredRoots(request.id);
  return request;
}

absl::Status Kms::ResumeRootMigration() {
  CUSTOS_ASSIGN_OR_RETURN(
      const std::optional<std::string> stored,
      options_.store->GetSetting(kRootMigrationSetting, storage::KeyStore::Absence::kHarmless));
  if (!stored.has_value() || stored->empty()) return absl::OkStatus();
  CUSTOS_ASSIGN_OR_RETURN(const Migration migration, Migration::Decode(*stored));
  std::thread finished;  // the last one's thread, done with its work
  {
    std::lock_guard lock(migration_mu_);
    if (migration_stopping_ || migration_running_) return absl::OkStatus();
    finished = std::move(migration_thread_);
  }
  // Joined without migration_mu_, which the thread's last lines take. Every starter holds
  // requests_mu_, so nothing else starts one meanwhile.
  if (finished.joinable()) finished.join();
  std::lock_guard lock(migration_mu_);
  if (migration_stopping_) return absl::OkStatus();
  migration_running_ = true;
  migration_request_ = migration.request;
  migration_progress_ =
      StrCat("re-wrapping key versions off legacy roots under '", migration.to, "': starting");
  migration_thread_ = std::thread([this, job = *stored] { MigrateRoots(job); });
  return absl::OkStatus();
}

Request Kms::WithProgress(Request request) const {
  if (request.operation != policy::OperationName(policy::Operation::kRotateRootKey) ||
      request.state != RequestState::kExecuted) {
    return request;
  }
  {
    std::lock_guard lock(migration_mu_);
    if (migration_running_ && request.id == migration_request_) {
      request.progress = migration_progress_;
      return request;
    }
  }
  // Not running here: stopped with the server, or not yet resumed after a start.
  const absl::StatusOr<std::optional<std::string>> stored =
      options_.store->GetSetting(kRootMigrationSetting, storage::KeyStore::Absence::kHarmless);
  if (!stored.ok() || !stored->has_value() || (*stored)->empty()) return request;
  const absl::StatusOr<Migration> migration = Migration::Decode(**stored);
  if (migration.ok() && migration->request == request.id) {
    request.progress = StrCat("re-wrapping key versions off legacy roots under '", migration->to,
                              "': paused; the next maintenance turn resumes it");
  }
  return request;
}

void Kms::MigrateRoots(const std::string& job) {
  const Migration migration = *Migration::Decode(job);  // checked by ResumeRootMigration
  std::map<std::string, bool> confines;                 // by root label
  uint64_t left_at_start = migration.to_move, moved = 0;
  auto note = [&](const std::string& waiting) {
    std::lock_guard lock(migration_mu_);
    migration_progress_ =
        StrCat("re-wrapping key versions off legacy roots under '", migration.to,
               "': ", migration.to_move - std::min(left_at_start, migration.to_move) + moved,
               " of ", migration.to_move, " done", waiting.empty() ? "" : "; waiting: ", waiting);
  };
  // Runs `step` until it succeeds, waiting out HSM and audit log outages (and a log awaiting
  // re-anchoring) with a growing pause; false once stopped.
  auto until_done = [&](absl::FunctionRef<absl::Status()> step) {
    std::chrono::milliseconds pause = kFirstRetry;
    for (;;) {
      const absl::Status status = step();
      if (status.ok()) return true;
      if (pause == kFirstRetry) {
        spdlog::warn("root rotation {}: re-wrapping waits: {}", migration.request,
                     status.ToString());
      }
      note(std::string(status.message()));
      if (!MigrationPause(pause)) return false;
      pause = std::min(pause * 2, kLastRetry);
    }
  };
  bool finished = until_done([&]() -> absl::Status {
    CUSTOS_ASSIGN_OR_RETURN(left_at_start,
                            LegacyVersions(*options_.hsm, *options_.store, migration.to, confines));
    return absl::OkStatus();
  });
  spdlog::info("root rotation {}: re-wrapping {} key versions under {} in the background",
               migration.request, left_at_start, migration.to);
  std::string page_token;
  bool more = true;
  while (finished && more) {
    note("");
    finished = until_done([&]() -> absl::Status {
      CUSTOS_ASSIGN_OR_RETURN(const storage::KeyPage page,
                              options_.store->ListKeys(kMigrationPageKeys, page_token));
      // Re-wrapped outside the request lock: officers and maintenance go on meanwhile.
      struct Rewrapped {
        uint32_t version;
        std::string from_root;
        Bytes from, to;
      };
      std::map<std::string, std::vector<Rewrapped>> rewrapped;  // by key id
      std::vector<audit::Event> events;  // versions that cannot move, and why
      for (const KeyRef& key : page.keys) {
        for (const storage::KeyVersion& version : key->versions) {
          if (version.wrapped.empty() || version.root_key_label == migration.to) continue;
          auto known = confines.find(version.root_key_label);
          if (known == confines.end()) {
            CUSTOS_ASSIGN_OR_RETURN(const bool confining,
                                    options_.hsm->RootKeyConfinesVersions(version.root_key_label));
            known = confines.emplace(version.root_key_label, confining).first;
          }
          if (known->second) continue;
          absl::StatusOr<Bytes> wrapped = absl::DataLossError("its row failed its check");
          if (key->integrity_problem.empty()) {
            wrapped = options_.hsm->RewrapKey(
                {StrCat(key->id, "/", version.version), version.wrapped, version.root_key_label},
                migration.to);
          }
          if (absl::IsUnavailable(wrapped.status())) return wrapped.status();  // the HSM
          if (!wrapped.ok()) {  // this version's own fault: it stays, recorded
            events.push_back(ServerEvent("RewrapKeyVersions", key->id, migration.request,
                                         wrapped.status().code(),
                                         StrCat("version ", version.version,
                                                " not re-wrapped: ", wrapped.status().message())));
            continue;
          }
          rewrapped[key->id].push_back(
              {version.version, version.root_key_label, version.wrapped, *std::move(wrapped)});
        }
      }
      uint64_t page_moved = 0;
      if (!rewrapped.empty() || !events.empty()) {
        std::unique_lock lock(requests_mu_);
        CUSTOS_RETURN_IF_ERROR(ServingAllowed(policy::Operation::kRotateRootKey));
        storage::WriteBatch batch;
        for (const auto& [key_id, versions] : rewrapped) {
          // The key as it is now: an officer may have rotated or destroyed it meanwhile. Only
          // versions still exactly as they were re-wrapped are replaced.
          CUSTOS_ASSIGN_OR_RETURN(const KeyRef current, options_.store->GetKey(key_id));
          KeyRecord key = *current;
          size_t key_moved = 0;
          for (const Rewrapped& done : versions) {
            for (storage::KeyVersion& version : key.versions) {
              if (version.version != done.version || version.wrapped != done.from ||
                  version.root_key_label != done.from_root) {
                continue;
              }
              version.wrapped = done.to;
              version.root_key_label = migration.to;
              ++key_moved;
            }
          }
          if (key_moved == 0) continue;
          audit::Event event = ServerEvent(
              "RewrapKeyVersions", key.id, migration.request, absl::StatusCode::kOk,
              StrCat(key_moved, " versions re-wrapped from a legacy root under ", migration.to));
          event.row = storage::KeyRowName(key.id);
          events.push_back(std::move(event));
          batch.keys.push_back(std::move(key));
          page_moved += key_moved;
        }
        CUSTOS_RETURN_IF_ERROR(Commit(std::move(batch), events));
      }
      moved += page_moved;
      page_token = page.next_page_token;
      more = !page_token.empty();
      return absl::OkStatus();
    });
    std::lock_guard lock(migration_mu_);
    if (migration_stopping_) finished = false;
  }
  if (finished) {
    (void)until_done([&]() -> absl::Status {
      std::unique_lock lock(requests_mu_);
      CUSTOS_RETURN_IF_ERROR(ServingAllowed(policy::Operation::kRotateRootKey));
      CUSTOS_ASSIGN_OR_RETURN(const uint64_t left, LegacyVersions(*options_.hsm, *options_.store,
                                                                  migration.to, confines));
      CUSTOS_ASSIGN_OR_RETURN(Request request, options_.store->GetRequest(migration.request));
      request.reason = migration.Done(left);
      storage::WriteBatch batch;
      batch.requests.push_back(request);
      batch.settings[kRootMigrationSetting] = "";
      audit::Event finished_event = ServerEvent("RootRotationFinished", "", request.id,
                                                absl::StatusCode::kOk, request.reason);
      finished_event.row = storage::RequestRowName(request.id);
      audit::Event cleared = ServerEvent("RootMigrationDone", "", request.id, absl::StatusCode::kOk,
                                         "nothing left to re-wrap");
      cleared.row = storage::SettingRowName(kRootMigrationSetting);
      CUSTOS_RETURN_IF_ERROR(
          Commit(std::move(batch), {std::move(finished_event), std::move(cleared)}));
      spdlog::info("root rotation {}: {}", request.id, request.reason);
      // Roots that still wrap versions, or cannot be destroyed now, are left to maintenance.
      (void)DestroyRetiredRoots(request.id);
      // Done, under the request lock that cleared the setting: a rotation approved from now on
      // starts its own work at once.
      std::lock_guard done(migration_mu_);
      migration_running_ = false;
      migration_request_.clear();
      migration_progress_.clear();
      return absl::OkStatus();
    });
  }
  std::lock_guard lock(migration_mu_);
  if (migration_request_ == migration.request) {  // stopped before the end
    migration_running_ = false;
    migration_request_.clear();
    migration_progress_.clear();
  }
}

absl::StatusOr<std::vector<std::string>> Kms::RetiredRoots(
    storage::KeyStore::Absence absence) const {
  CUSTOS_ASSIGN_OR_RETURN(std::optional<std::string> stored,
                          options_.store->GetSetting(kRetiredRootsSetting, absence));
  if (!stored || stored->empty()) return std::vector<std::string>();
  const nlohmann::json labels = nlohmann::json::parse(*stored, nullptr, /*allow_exceptions=*/false);
  if (!labels.is_array()) return absl::InternalError("the stored retired roots are not a list");
  std::vector<std::string> out;
  for (const nlohmann::json& label : labels) {
    if (!label.is_string()) return absl::InternalError("a stored retired root is not a label");
    out.push_back(label.get<std::string>());
  }
  return out;
}

absl::StatusOr<std::optional<std::map<std::string, uint64_t>>> Kms::CheckedRootUse(
    const std::set<std::string>& labels) {
  const auto now = std::chrono::steady_clock::now();
  if (now < root_use_unknown_until_) return std::nullopt;
  absl::StatusOr<std::map<std::string, uint64_t>> counted =
      options_.store->CountVersionsChecked(labels);
  if (!storage::RefusedRow(counted.status())) return counted;
  RaiseIntegrityAlarm(counted.status());
  root_use_unknown_until_ = now + std::chrono::hours(1);
  return std::nullopt;
}

absl::Status Kms::DestroyRetiredRoots(const std::string& request_id) {
  std::string current;
  {
    std::lock_guard lock(policy_mu_);
    // Unproven, it may be a retired root put back in use: nothing goes until it is proven.
    if (!root_proven_) return absl::OkStatus();
    current = root_key_label_;
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> retired, RetiredRoots());
  if (retired.empty()) return absl::OkStatus();
  std::vector<std::string> remaining;
  std::set<std::string> unused;  // by the version index's count
  for (const std::string& label : retired) {
    if (label == current) continue;  // never destroyed while new versions use it
    CUSTOS_ASSIGN_OR_RETURN(const uint64_t wrapped, options_.store->CountVersionsUnderRoot(label));
    if (wrapped > 0) {
      remaining.push_back(label);
    } else {
      unused.insert(label);
    }
  }
  // The index is not checked: a version row moved to another root, emptied or deleted with
  // SQL would have the HSM shred every live key wrapped under this one. Every key's checked
  // row must agree first.
  std::set<std::string> to_check;
  for (const std::string& label : unused) {
    if (roots_checked_empty_.count(label) == 0) to_check.insert(label);
  }
  std::optional<std::map<std::string, uint64_t>> checked;
  if (!to_check.empty()) {
    CUSTOS_ASSIGN_OR_RETURN(checked, CheckedRootUse(to_check));
    for (const auto& [label, count] : checked.value_or(std::map<std::string, uint64_t>())) {
      if (count == 0) roots_checked_empty_.insert(label);
    }
  }
  std::vector<audit::Event> events;
  absl::Status first_failure;
  for (const std::string& label : retired) {
    if (unused.count(label) == 0) continue;
    if (roots_checked_empty_.count(label) == 0) {
      spdlog::error("root rotation: retired root '{}' is kept: {}", label,
                    checked.has_value() ? "the version index misses versions stored under it"
                                        : "a key's row failed its integrity check");
      remaining.push_back(label);
      continue;
    }
    // Nothing refers to it any more. Destroying it bounds how long a destroyed key survives
    // in old database backups: their wrapped bytes are useless without it.
    absl::Status destroyed = options_.hsm->DestroyRootKey(label);
    if (absl::IsNotFound(destroyed)) destroyed = absl::OkStatus();  // done before a crash
    events.push_back(
        ServerEvent("DestroyRootKey", "", request_id, destroyed.code(), "root " + label));
    if (!destroyed.ok()) {
      remaining.push_back(label);
      if (first_failure.ok()) first_failure = destroyed;
    }
  }
  if (remaining.size() == retired.size() && events.empty()) return absl::OkStatus();
  if (events.empty()) {  // only the current root dropped from the list
    events.push_back(ServerEvent("RetireRootKeys", "", request_id, absl::StatusCode::kOk,
                                 StrCat("retired: ", nlohmann::json(remaining).dump())));
  }
  events.front().row = storage::SettingRowName(kRetiredRootsSetting);
  storage::WriteBatch batch;
  batch.settings[kRetiredRootsSetting] = nlohmann::json(remaining).dump();
  CUSTOS_RETURN_IF_ERROR(Commit(std::move(batch), events));
  return first_failure;
}

}  // namespace custos::core
