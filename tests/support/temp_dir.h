// TempDir: a private (0700) directory under $TMPDIR, removed with everything in it on exit.
#pragma once

#include <string>

namespace custos::testing {

class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace custos::testing
