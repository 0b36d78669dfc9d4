// Early-return helpers for absl::Status / absl::StatusOr, which Debian's abseil does not ship.
// Use them for anything a request or the environment can cause; use checks (abort) only for states
// that cannot happen.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define NEEDLE_CONCAT_INNER_(a, b) a##b
#define NEEDLE_CONCAT_(a, b) NEEDLE_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if it is not OK.
#define NEEDLE_RETURN_IF_ERROR(expr)                  \
  do {                                                \
    ::absl::Status needle_status_ = (expr);           \
    if (!needle_status_.ok()) return needle_status_;  \
  } while (0)

// `lhs = value of expr` (an absl::StatusOr<T>), or returns its status from the enclosing function.
#define NEEDLE_ASSIGN_OR_RETURN(lhs, expr) \
  NEEDLE_ASSIGN_OR_RETURN_IMPL_(NEEDLE_CONCAT_(needle_statusor_, __LINE__), lhs, expr)

#define NEEDLE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()
