#include "engine/metrics.h"

#include <algorithm>
#include <cmath>

namespace needle::engine {

void LatencyHistogram::Observe(double seconds) {
  if (!(seconds > 0)) seconds = 0;  // negative or NaN
  const size_t i = static_cast<size_t>(std::lower_bound(kBounds.begin(), kBounds.end(), seconds) - kBounds.begin());
  ++buckets[i];
  ++count;
  sum += seconds;
}

}  // namespace needle::engine
