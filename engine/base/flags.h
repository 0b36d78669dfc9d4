// Command-line helpers shared by needle's programs: lets users write flags with dashes
// (--max-tokens) as well as absl's underscores (--max_tokens).
#pragma once

#include <string>
#include <vector>

namespace needle {

// Returns argv with every "--some-flag[=v]" rewritten to "--some_flag[=v]" (values untouched).
inline std::vector<std::string> NormalizeFlagNames(int argc, char** argv) {
  std::vector<std::string> out;
  bool rest_positional = false;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") rest_positional = true;
    if (!rest_positional && i > 0 && a.size() > 2 && a[0] == '-' && a[1] == '-') {
      const size_t eq = a.find('=');
      for (size_t j = 2; j < a.size() && j < eq; ++j) {
        if (a[j] == '-') a[j] = '_';
      }
    }
    out.push_back(std::move(a));
  }
  return out;
}

}  // namespace needle
