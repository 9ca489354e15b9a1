#include "storage/state_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace custos::storage {
namespace {

absl::Status ErrnoError(const char* what, const std::string& path) {
  return absl::UnavailableError(absl::StrCat(what, " '", path, "': ", std::strerror(errno),
                                             errno == ENOSPC ? " (the disk is full)" : ""));
}

// What the holder wrote into the file ("pid 1234"), for the refusal message.
std::string Holder(int fd) {
  char buffer[64] = {};
  const ssize_t n = ::pread(fd, buffer, sizeof buffer - 1, 0);
  std::string text(buffer, n > 0 ? static_cast<size_t>(n) : 0);
  text = std::string(absl::StripAsciiWhitespace(text));
  return text.empty() ? "a process that has not written its pid yet" : text;
}

}  // namespace

absl::StatusOr<std::unique_ptr<StateLock>> StateLock::Acquire(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoError("cannot open lock file", path);
  std::unique_ptr<StateLock> lock(new StateLock(fd));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) return ErrnoError("cannot lock", path);
    return absl::FailedPreconditionError(
        absl::StrCat("the key database is in use by another process (", Holder(fd), ", holding '",
                     path, "'); only one custosd may serve a state: stop it first"));
  }
  const std::string holder = absl::StrCat("pid ", ::getpid(), "\n");
  if (::ftruncate(fd, 0) != 0 ||
      ::pwrite(fd, holder.data(), holder.size(), 0) != static_cast<ssize_t>(holder.size())) {
    return ErrnoError("cannot write lock file", path);
  }
  struct stat st {};
  if (::fstat(fd, &st) == 0 && (st.st_mode & 0777) != 0600) (void)::fchmod(fd, 0600);
  return lock;
}

StateLock::~StateLock() { ::close(fd_); }  // Closing the last descriptor drops the lock.

}  // namespace custos::storage
