// Housekeeping the server does by itself (pre-approved by policy, audited as the server):
// expiry, crypto-shredding when a deletion is due, automatic rotation; and the root keys:
// rotation, and destroying the roots a rotation retired once nothing they wrap is left.
#include <map>
#include <optional>
#include <set>

#include "absl/strings/cord.h"
#include "common/strings.h"
#include "core/call.h"
#include "core/kms.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"
#include "storage/row_codec.h"

namespace custos::core {
namespace {

using policy::Operation;
using storage::KeyRecord;
using storage::KeyState;
using storage::RequestState;

}  // namespace

absl::Status Kms::DestroyKey(const std::string& key_id) {
  CUSTOS_ASSIGN_OR_RETURN(KeyRef current, options_.store->GetKey(key_id));
  KeyRecord key = *current;
  for (storage::KeyVersion& version : key.versions) version.wrapped.clear();
  key.state = KeyState::kDestroyed;
  key.destroyed_at = options_.clock->NowSeconds();
  storage::WriteBatch batch;
  batch.keys.push_back(key);
  audit::Event destroyed = ServerEvent("DestroyKey", key.id, "", absl::StatusCode::kOk);
  destroyed.row = storage::KeyRowName(key.id);
  // The WAL still holds the erased bytes until it is purged: remembered in the same
  // transaction (and recorded, so that nobody can put back a "done"), so that a purge that
  // fails (a reader holding the file) or a crash is retried until it succeeds.
  batch.settings.emplace(kPurgePendingSetting, "1");
  audit::Event pending = ServerEvent("PurgePending", key.id, "", absl::StatusCode::kOk,
                                     "erased material stays in the WAL until it is purged");
  pending.row = storage::SettingRowName(kPurgePendingSetting);
  CUSTOS_RETURN_IF_ERROR(Commit(std::move(batch), {std::move(destroyed), std::move(pending)}));
  for (const storage::KeyVersion& version : key.versions) {
    options_.hsm->Forget(StrCat(key.id, "/", version.version));
  }
  return absl::OkStatus();  // the purge follows, once for every key destroyed this turn
}

absl::Status Kms::PurgeErased() {
  CUSTOS_ASSIGN_OR_RETURN(const std::optional<std::string> pending,
                          options_.store->GetSetting(kPurgePendingSetting));
  if (pending.value_or(std::string()) != std::string_view("1")) return absl::OkStatus();
  absl::Status purged = options_.store->PurgeErased();
  audit::Event event = ServerEvent("PurgeErasedMaterial", "", "", purged.code(),
                                   purged.ok() ? "" : std::string(purged.message()));
  storage::WriteBatch done;
  if (purged.ok()) {
    done.settings.emplace(kPurgePendingSetting, "0");
    event.row = storage::SettingRowName(kPurgePendingSetting);
  }
  CUSTOS_RETURN_IF_ERROR(Commit(std::move(done), {std::move(event)}));
  return purged;
}

absl::Status Kms::RunMaintenance() {
  // A slice of the log's older records recomputed (outside the request lock), so that no first
  // use of a row last changed long ago waits for it; a change found there is alarmed once.
  if (const absl::Status older = options_.store->VerifyOlderAuditRecords(kOlderRecordsPerTurn);
      absl::IsFailedPrecondition(older)) {
    absl::Status alarm = absl::DataLossError(
        StrCat("the audit log was changed after it was written: ", older.message()));
    alarm.SetPayload(storage::kIntegrityPayload, absl::Cord("audit_log"));
    RaiseIntegrityAlarm(alarm);
  }
  std::lock_guard lock(requests_mu_);
  // Nothing acts on a catalogue whose log failed its check until officers re-anchor it.
  CUSTOS_RETURN_IF_ERROR(ServingAllowed(Operation::kRotateKey));
  absl::Status done = RunMaintenanceLocked();
  RaiseIntegrityAlarm(done);
  return done;
}

absl::Status Kms::RunMaintenanceLocked() {
  const int64_t now = options_.clock->NowSeconds();
  CUSTOS_ASSIGN_OR_RETURN(const int64_t observed, observed_.Now());
  if (std::optional<int64_t> jump = observed_.TakeWallClockJump(kClockJumpToleranceSeconds)) {
    const std::string detail =
        StrCat("the wall clock moved ", *jump, " s against the time this server observed passing; ",
               "key destruction waits for both clocks");
    spdlog::error("clock: {}", detail);
    CUSTOS_RETURN_IF_ERROR(
        Commit({}, {ServerEvent("ClockJump", "", "", absl::StatusCode::kOk, detail)}));
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Request> pending, options_.store->PendingRequests());
  for (Request& request : pending) {
    if (request.expires_at <= now) CUSTOS_RETURN_IF_ERROR(Expire(std::move(request)));
  }
  CUSTOS_RETURN_IF_ERROR(DestroyRetiredRoots(""));
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> due,
                          options_.store->KeysDueForDeletion(now, observed));
  for (const std::string& key_id : due) CUSTOS_RETURN_IF_ERROR(DestroyKey(key_id));
  // A purge that cannot run now (a reader holding the file) is retried next turn; the rest of
  // the turn does not wait for it.
  absl::Status purged = PurgeErased();
  // Rotations due by period (whatever the primary version), then those a version's usage asked
  // for (only while that version is still primary: one crossing, one rotation).
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> stale, options_.store->KeysDueForRotation(now));
  for (const std::string& key_id : stale) CUSTOS_RETURN_IF_ERROR(AutoRotate(key_id, std::nullopt));
  for (const auto& [key_id, version] : usage_.RotationWanted()) {
    CUSTOS_RETURN_IF_ERROR(AutoRotate(key_id, version));
    usage_.RotationDone(key_id, version);
  }
  CUSTOS_RETURN_IF_ERROR(observed_.Persist());
  CUSTOS_RETURN_IF_ERROR(usage_.Flush());
  return purged;
}

absl::Status Kms::AutoRotate(const std::string& key_id, std::optional<uint32_t> worn_version) {
  CUSTOS_ASSIGN_OR_RETURN(KeyRef key, options_.store->GetKey(key_id));
  if (key->state != KeyState::kEnabled) return absl::OkStatus();  // nothing encrypts under it
  if (worn_version && key->primary_version != *worn_version) return absl::OkStatus();  // done
  absl::StatusOr<KeyRecord> rotated = Applied(*key, Operation::kRotateKey, {});
  if (!rotated.ok()) {
    (void)Commit({}, {ServerEvent("AutoRotateKey", key_id, "", rotated.status().code())});
    return rotated.status();
  }
  storage::WriteBatch batch;
  batch.keys.push_back(*rotated);
  audit::Event event = ServerEvent("AutoRotateKey", key_id, "", absl::StatusCode::kOk);
  event.key_version = rotated->primary_version;
  event.row = storage::KeyRowName(key_id);
  return Commit(std::move(batch), {event});
}

namespace {

// The next root label: "custos-root" -> "custos-root.2" -> "custos-root.3" ...
std::string NextRootLabel(const std::string& label) {
  const size_t dot = label.rfind('.');
  if (dot != std::string::npos && dot + 1 < label.size() && dot + 10 > label.size() &&
      label.find_first_not_of("0123456789", dot + 1) == std::string::npos) {
    return StrCat(label.substr(0, dot), ".", std::stoi(label.substr(dot + 1)) + 1);
  }
  return StrCat(label, ".2");
}

}  // namespace

absl::StatusOr<Request> Kms::RotateRoot(Call& call, Request request) {
  // Roots retired earlier that nothing depends on any more go first.
  CUSTOS_RETURN_IF_ERROR(DestroyRetiredRoots(request.id));
  const std::string old_root = CurrentRoot();
  const std::string new_root = NextRootLabel(old_root);
  // ALREADY_EXISTS: an earlier attempt was cut short; carry on where it stopped.
  absl::Status created = options_.hsm->CreateRootKey(new_root);
  if (!created.ok() && !absl::IsAlreadyExists(created)) return created;
  // Versions under a legacy root (one that does not confine what it unwraps) move to the new
  // root, inside the HSM. Versions under a confining root cannot move, by design: they stay
  // under it, and it is destroyed once the last of them is (see DestroyRetiredRoots).
  std::map<std::string, bool> confines;  // by root label
  std::set<std::string> retired = {old_root};
  size_t rewrapped = 0, kept = 0;
  std::string page_token;
  do {  // Page by page: each page commits on its own, so a crash loses no finished work.
    CUSTOS_ASSIGN_OR_RETURN(storage::KeyPage page, options_.store->ListKeys(1000, page_token));
    storage::WriteBatch batch;
    std::vector<audit::Event> events;  // one per key moved, naming its row
    size_t moved = 0;
    for (const KeyRef& current : page.keys) {
      KeyRecord key = *current;
      size_t key_moved = 0;
      for (storage::KeyVersion& version : key.versions) {
        if (version.wrapped.empty() || version.root_key_label == new_root) continue;
        retired.insert(version.root_key_label);
        auto known = confines.find(version.root_key_label);
        if (known == confines.end()) {
          CUSTOS_ASSIGN_OR_RETURN(const bool confining,
                                  options_.hsm->RootKeyConfinesVersions(version.root_key_label));
          known = confines.emplace(version.root_key_label, confining).first;
        }
        if (known->second) {
          ++kept;
          continue;
        }
        CUSTOS_ASSIGN_OR_RETURN(Bytes wrapped,
                                options_.hsm->RewrapKey({StrCat(key.id, "/", version.version),
                                                         version.wrapped, version.root_key_label},
                                                        new_root));
        version.wrapped = std::move(wrapped);
        version.root_key_label = new_root;
        ++key_moved;
      }
      if (key_moved == 0) continue;
      audit::Event event =
          ServerEvent("RewrapKeyVersions", key.id, request.id, absl::StatusCode::kOk,
                      StrCat(key_moved,
                             " versions re-wrapped from a legacy root "
                             "under ",
                             new_root));
      event.row = storage::KeyRowName(key.id);
      events.push_back(std::move(event));
      batch.keys.push_back(std::move(key));
      moved += key_moved;
    }
    if (!batch.keys.empty()) {  // each page commits on its own, each key recorded
      CUSTOS_RETURN_IF_ERROR(Commit(std::move(batch), events));
    }
    rewrapped += moved;
    page_token = page.next_page_token;
  } while (!page_token.empty());

  request.state = RequestState::kExecuted;
  request.closed_at = options_.clock->NowSeconds();
  request.reason = StrCat("root key rotated from '", old_root, "' to '", new_root, "'; ", rewrapped,
                          " key versions re-wrapped from legacy roots; ", kept,
                          " stay under the confining roots that wrapped them");
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> already_retired, RetiredRoots());
  retired.insert(already_retired.begin(), already_retired.end());
  retired.erase(new_root);
  storage::WriteBatch batch;
  batch.requests.push_back(request);
  batch.settings[kRootKeySetting] = new_root;
  // Remembered durably, so that their destruction is retried after a failure or a crash.
  batch.settings[kRetiredRootsSetting] = nlohmann::json(retired).dump();
  audit::Event rotated = ServerEvent(
      "RotateRootKey", "", request.id, absl::StatusCode::kOk,
      StrCat("new root ", new_root, "; ", rewrapped, " versions re-wrapped, ", kept, " kept"));
  rotated.row = storage::SettingRowName(kRootKeySetting);
  audit::Event retire = ServerEvent("RetireRootKeys", "", request.id, absl::StatusCode::kOk,
                                    StrCat("retired: ", nlohmann::json(retired).dump()));
  retire.row = storage::SettingRowName(kRetiredRootsSetting);
  call.event().row = storage::RequestRowName(request.id);
  CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch), absl::StatusCode::kOk,
                                         {std::move(rotated), std::move(retire)}));
  {
    std::lock_guard lock(policy_mu_);
    root_key_label_ = new_root;
  }
  // The rotation is done; roots that still wrap versions, or cannot be destroyed now, are left
  // to maintenance.
  (void)DestroyRetiredRoots(request.id);
  return request;
}

absl::StatusOr<std::vector<std::string>> Kms::RetiredRoots() const {
  CUSTOS_ASSIGN_OR_RETURN(std::optional<std::string> stored,
                          options_.store->GetSetting(kRetiredRootsSetting));
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

absl::Status Kms::DestroyRetiredRoots(const std::string& request_id) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> retired, RetiredRoots());
  if (retired.empty()) return absl::OkStatus();
  const std::string current = CurrentRoot();
  std::vector<std::string> remaining;
  std::vector<audit::Event> events;
  absl::Status first_failure;
  for (const std::string& label : retired) {
    if (label == current) continue;  // never destroyed while new versions use it
    CUSTOS_ASSIGN_OR_RETURN(const uint64_t wrapped, options_.store->CountVersionsUnderRoot(label));
    if (wrapped > 0) {
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
