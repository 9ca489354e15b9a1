#include "storage/audit_archive.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string_view>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace custos::storage {
namespace {

constexpr size_t kPage = 1000;

absl::Status Unavailable(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// A file written through a descriptor, hashed as it goes.
class HashedFile {
 public:
  static absl::StatusOr<std::unique_ptr<HashedFile>> Create(const std::string& path) {
    // A partial file left by a crash may still be a second name of a finished archive (after
    // its link, before its removal): unlinked, never truncated.
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Unavailable(absl::StrCat("cannot remove ", path));
    }
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return Unavailable(absl::StrCat("cannot create ", path));
    return std::unique_ptr<HashedFile>(new HashedFile(fd, path));
  }
  ~HashedFile() {
    if (fd_ >= 0) close(fd_);
    EVP_MD_CTX_free(sha_);
  }

  absl::Status Write(const std::string& line) {
    buffer_ += line;
    buffer_ += '\n';
    return buffer_.size() >= (1 << 20) ? Flush() : absl::OkStatus();
  }

  // Flushes, syncs and closes; the file's SHA-256 in hex.
  absl::StatusOr<std::string> Finish() {
    CUSTOS_RETURN_IF_ERROR(Flush());
    if (fsync(fd_) != 0) return Unavailable(absl::StrCat("cannot flush ", path_));
    const int fd = std::exchange(fd_, -1);
    if (close(fd) != 0) return Unavailable(absl::StrCat("cannot close ", path_));
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    EVP_DigestFinal_ex(sha_, digest, &length);
    return audit::ToHex(std::span<const uint8_t>(digest, length));
  }

 private:
  HashedFile(int fd, std::string path) : fd_(fd), path_(std::move(path)), sha_(EVP_MD_CTX_new()) {
    EVP_DigestInit_ex(sha_, EVP_sha256(), nullptr);
  }

  absl::Status Flush() {
    EVP_DigestUpdate(sha_, buffer_.data(), buffer_.size());
    size_t done = 0;
    while (done < buffer_.size()) {
      const ssize_t wrote = write(fd_, buffer_.data() + done, buffer_.size() - done);
      if (wrote < 0 && errno == EINTR) continue;
      if (wrote < 0) return Unavailable(absl::StrCat("cannot write ", path_));
      done += static_cast<size_t>(wrote);
    }
    buffer_.clear();
    return absl::OkStatus();
  }

  int fd_;
  std::string path_;
  EVP_MD_CTX* sha_;
  std::string buffer_;
};

absl::StatusOr<std::string> FileSha256(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Unavailable(absl::StrCat("cannot read ", path));
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> sha(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(sha.get(), EVP_sha256(), nullptr);
  std::string buffer(1 << 16, '\0');
  while (in.read(buffer.data(), static_cast<std::streamsize>(buffer.size())) || in.gcount() > 0) {
    EVP_DigestUpdate(sha.get(), buffer.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) return Unavailable(absl::StrCat("cannot read ", path));
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(sha.get(), digest, &length);
  return audit::ToHex(std::span<const uint8_t>(digest, length));
}

absl::Status SyncDirectory(const std::string& dir) {
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 || fsync(fd) != 0) {
    absl::Status failed = Unavailable(absl::StrCat("cannot flush directory ", dir));
    if (fd >= 0) close(fd);
    return failed;
  }
  close(fd);
  return absl::OkStatus();
}

// Writes the records and checkpoints of the archive; returns the file's digest and how many
// checkpoints it holds.
absl::StatusOr<std::pair<std::string, uint64_t>> WriteLines(const KeyStore& store,
                                                            const std::string& path, uint64_t floor,
                                                            uint64_t through) {
  CUSTOS_ASSIGN_OR_RETURN(auto file, HashedFile::Create(path));
  for (uint64_t next = floor + 1; next <= through;) {
    CUSTOS_ASSIGN_OR_RETURN(const std::vector<audit::Record> page,
                            store.ReadAudit(next, std::min<uint64_t>(kPage, through - next + 1)));
    if (page.empty()) break;  // the verification below names what is missing
    for (const audit::Record& record : page)
      CUSTOS_RETURN_IF_ERROR(file->Write(ToJsonLine(record)));
    next = page.back().seq + 1;
  }
  uint64_t checkpoints = 0;
  for (uint64_t next = std::max<uint64_t>(floor, 1); next <= through;) {
    CUSTOS_ASSIGN_OR_RETURN(const std::vector<audit::Checkpoint> page,
                            store.ReadCheckpoints(next, kPage));
    for (const audit::Checkpoint& checkpoint : page) {
      if (checkpoint.seq > through) break;
      CUSTOS_RETURN_IF_ERROR(file->Write(CheckpointToJsonLine(checkpoint)));
      ++checkpoints;
    }
    if (page.size() < kPage) break;
    next = page.back().seq + 1;
  }
  CUSTOS_ASSIGN_OR_RETURN(std::string digest, file->Finish());
  return std::make_pair(std::move(digest), checkpoints);
}

// Reads the archive back as an auditor would.
absl::Status VerifyArchive(const std::string& path, uint64_t floor,
                           const audit::Checkpoint& through, const audit::PublicKeyVerifier& key) {
  std::ifstream lines(path);
  std::ifstream checkpoint_lines(path);
  if (!lines || !checkpoint_lines) return Unavailable(absl::StrCat("cannot read back ", path));
  CUSTOS_ASSIGN_OR_RETURN(const std::vector<audit::Checkpoint> checkpoints,
                          audit::ReadCheckpointLines(checkpoint_lines));
  audit::JsonLinesRecordSource records(&lines);
  const audit::VerifyReport report = audit::Verify(records, checkpoints, &through, key);
  if (!report.ok) {
    return absl::FailedPreconditionError(
        absl::StrCat("the archive does not verify, so nothing was removed: ", report.reason));
  }
  if (report.starts_after != floor || report.last_verified_seq != through.seq) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the archive holds records ", report.starts_after + 1, " to ", report.last_verified_seq,
        ", not ", floor + 1, " to ", through.seq, ", so nothing was removed"));
  }
  return absl::OkStatus();
}

// The last seq of a pending archive named "audit-<12 digits>-<12 digits>.jsonl.pending";
// nullopt for any other name.
std::optional<uint64_t> PendingArchiveEnd(std::string_view name) {
  constexpr std::string_view kPrefix = "audit-";
  constexpr std::string_view kSuffix = ".jsonl.pending";
  constexpr size_t kDigits = 12;
  const auto digits = [](std::string_view text) {
    return std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  if (name.size() != kPrefix.size() + 2 * kDigits + 1 + kSuffix.size() ||
      name.substr(0, kPrefix.size()) != kPrefix ||
      name.substr(name.size() - kSuffix.size()) != kSuffix ||
      name[kPrefix.size() + kDigits] != '-') {
    return std::nullopt;
  }
  const std::string_view first = name.substr(kPrefix.size(), kDigits);
  const std::string_view last = name.substr(kPrefix.size() + kDigits + 1, kDigits);
  uint64_t seq = 0;
  if (!digits(first) || !digits(last) ||
      !absl::SimpleAtoi(absl::string_view(last.data(), last.size()), &seq))
    return std::nullopt;
  return seq;
}

}  // namespace

absl::StatusOr<AuditArchiveFile> WriteAuditArchive(const KeyStore& store, const std::string& dir,
                                                   const audit::Checkpoint& through,
                                                   const audit::PublicKeyVerifier& key) {
  CUSTOS_ASSIGN_OR_RETURN(const AuditFloor floor, store.AuditLogFloor());
  if (through.seq <= floor.seq) {
    return absl::FailedPreconditionError(
        absl::StrCat("records up to ", floor.seq,
                     " are archived already; nothing to archive up to ", through.seq));
  }
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Unavailable(absl::StrCat("cannot create ", dir));
  }
  AuditArchiveFile archive;
  archive.first_seq = floor.seq + 1;
  archive.last_seq = through.seq;
  archive.path =
      absl::StrFormat("%s/audit-%012u-%012u.jsonl", dir, archive.first_seq, archive.last_seq);
  const std::string partial = archive.path + ".partial";
  const std::string pending = archive.path + ".pending";
  absl::Status written = [&]() -> absl::Status {
    CUSTOS_ASSIGN_OR_RETURN(auto written_lines, WriteLines(store, partial, floor.seq, through.seq));
    std::tie(archive.sha256_hex, archive.checkpoints) = std::move(written_lines);
    CUSTOS_RETURN_IF_ERROR(VerifyArchive(partial, floor.seq, through, key));
    // Never over another archive. The same file may be there (an archival whose commit was
    // durable though reported failed, published at the next start); a different one is a log
    // this database no longer holds (it was restored from an older backup since), and only a
    // person may decide what becomes of it.
    if (access(archive.path.c_str(), F_OK) == 0) {
      CUSTOS_ASSIGN_OR_RETURN(const std::string existing, FileSha256(archive.path));
      if (existing != archive.sha256_hex) {
        return absl::FailedPreconditionError(absl::StrCat(
            archive.path,
            " already holds a different archive of these records (was the database "
            "restored from an older backup since it was written?): keep it, move it elsewhere, "
            "and propose the archival again"));
      }
      std::remove(partial.c_str());
      return SyncDirectory(dir);
    }
    // Pending until the archival commits (PublishAuditArchives): an attempt that never commits
    // leaves no file among the archives. One left by such an attempt is replaced.
    if (rename(partial.c_str(), pending.c_str()) != 0) {
      return Unavailable(absl::StrCat("cannot rename ", partial));
    }
    return SyncDirectory(dir);
  }();
  if (!written.ok()) {
    std::remove(partial.c_str());
    return written;
  }
  return archive;
}

absl::StatusOr<std::vector<std::string>> PublishAuditArchives(const std::string& dir,
                                                              uint64_t floor) {
  std::vector<std::string> left;
  std::error_code error;
  std::filesystem::directory_iterator entries(dir, error);
  if (error == std::errc::no_such_file_or_directory) return left;
  if (error) {
    return absl::UnavailableError(absl::StrCat("cannot list ", dir, ": ", error.message()));
  }
  bool changed = false;
  for (const auto& entry : entries) {
    const std::optional<uint64_t> ends = PendingArchiveEnd(entry.path().filename().string());
    if (!ends) continue;
    const uint64_t last = *ends;
    const std::string pending = entry.path().string();
    const std::string path = pending.substr(0, pending.size() - std::strlen(".pending"));
    if (last > floor) {  // an archival that did not commit: its records are still live
      left.push_back(pending);
      continue;
    }
    // At the floor, the archive of the archival that committed last; before it, an attempt
    // that did not commit, whose records a committed archive holds.
    if (last == floor && link(pending.c_str(), path.c_str()) != 0) {
      if (errno != EEXIST) return Unavailable(absl::StrCat("cannot link ", path));
      CUSTOS_ASSIGN_OR_RETURN(const std::string published, FileSha256(path));
      CUSTOS_ASSIGN_OR_RETURN(const std::string waiting, FileSha256(pending));
      if (published != waiting) {
        left.push_back(pending);
        continue;
      }
    }
    if (unlink(pending.c_str()) != 0) return Unavailable(absl::StrCat("cannot remove ", pending));
    changed = true;
  }
  if (changed) CUSTOS_RETURN_IF_ERROR(SyncDirectory(dir));
  std::sort(left.begin(), left.end());
  return left;
}

}  // namespace custos::storage
