// Safetensors parsing, mapping, conversion and writing. The parser treats the file as hostile: every
// length, offset and shape is checked with overflow-free arithmetic before use, the JSON is parsed
// without exceptions and with a nesting limit, and no byte outside the file is ever addressed.
#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/base/status_macros.h"
#include "engine/bf16.h"
#include "nlohmann/json.hpp"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

namespace needle::engine {
namespace {

using json = nlohmann::json;

struct DTypeRow {
  DType dtype;
  const char* name;
  int size;
};
constexpr DTypeRow kDTypes[] = {
    {DType::kBool, "BOOL", 1},      {DType::kU8, "U8", 1},          {DType::kI8, "I8", 1},
    {DType::kF8E5M2, "F8_E5M2", 1}, {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kI16, "I16", 2},
    {DType::kU16, "U16", 2},        {DType::kF16, "F16", 2},        {DType::kBF16, "BF16", 2},
    {DType::kI32, "I32", 4},        {DType::kU32, "U32", 4},        {DType::kF32, "F32", 4},
    {DType::kF64, "F64", 8},        {DType::kI64, "I64", 8},        {DType::kU64, "U64", 8},
};

// A safetensors header is at most 3 levels deep (header -> entry -> shape); anything much deeper is
// garbage, and refusing it early keeps recursive JSON code (dump, destruction) off deep inputs.
constexpr int kMaxJsonDepth = 8;

// A SAX pass that only checks syntax and nesting depth, keeping the first error's text.
class SyntaxCheck {
 public:
  using number_integer_t = json::number_integer_t;
  using number_unsigned_t = json::number_unsigned_t;
  using number_float_t = json::number_float_t;
  using string_t = json::string_t;
  using binary_t = json::binary_t;

  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(number_integer_t) { return true; }
  bool number_unsigned(number_unsigned_t) { return true; }
  bool number_float(number_float_t, const string_t&) { return true; }
  bool string(string_t&) { return true; }
  bool binary(binary_t&) { return true; }
  bool start_object(std::size_t) { return Enter(); }
  bool key(string_t& k) {
    if (depth_ == 1 && !top_keys_.insert(k).second) {
      error = absl::StrCat("key \"", k, "\" appears twice");
      return false;
    }
    return true;
  }
  bool end_object() { return Leave(); }
  bool start_array(std::size_t) { return Enter(); }
  bool end_array() { return Leave(); }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) {
    if (error.empty()) error = ex.what();
    return false;
  }

  std::string error;

 private:
  bool Enter() {
    if (++depth_ > kMaxJsonDepth) {
      error = absl::StrCat("JSON nested deeper than ", kMaxJsonDepth, " levels");
      return false;
    }
    return true;
  }
  bool Leave() {
    --depth_;
    return true;
  }
  int depth_ = 0;
  std::set<std::string> top_keys_;  // duplicate keys would silently overwrite each other in the DOM
};

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Parses a JSON array of non-negative integers that fit in int64.
bool ReadUintArray(const json& j, std::vector<uint64_t>* out) {
  if (!j.is_array()) return false;
  out->clear();
  for (const json& v : j) {
    if (!v.is_number_unsigned()) return false;  // negatives parse as number_integer, fractions as float
    uint64_t x = v.get<uint64_t>();
    if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    out->push_back(x);
  }
  return true;
}

absl::Status TensorError(absl::string_view source, absl::string_view name, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": tensor \"", name, "\": ", what));
}

absl::StatusOr<TensorInfo> ParseEntry(absl::string_view source, const std::string& name, const json& e,
                                      uint64_t data_size, uint64_t file_size) {
  if (!e.is_object()) return TensorError(source, name, "entry is not a JSON object");
  TensorInfo info;
  info.name = name;
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string())
    return TensorError(source, name, "\"dtype\" is missing or not a string");
  auto dtype = DTypeFromName(dt->get<std::string>());
  if (!dtype.ok()) return TensorError(source, name, dtype.status().message());
  info.dtype = *dtype;

  auto sh = e.find("shape");
  std::vector<uint64_t> dims;
  if (sh == e.end() || !ReadUintArray(*sh, &dims)) {
    return TensorError(source, name, "\"shape\" must be an array of non-negative integers");
  }
  // numel * element size without overflow: a size beyond the file is wrong whatever its exact value.
  uint64_t nbytes = static_cast<uint64_t>(DTypeSize(info.dtype));
  bool too_big = false;
  for (uint64_t d : dims) info.shape.push_back(static_cast<int64_t>(d));
  if (std::find(dims.begin(), dims.end(), uint64_t{0}) != dims.end()) {
    nbytes = 0;
  } else {
    for (uint64_t d : dims) {
      if (nbytes > file_size / d) {
        too_big = true;
        break;
      }
      nbytes *= d;
    }
  }

  auto off = e.find("data_offsets");
  std::vector<uint64_t> offsets;
  if (off == e.end() || !ReadUintArray(*off, &offsets) || offsets.size() != 2) {
    return TensorError(source, name, "\"data_offsets\" must be two non-negative integers [begin, end]");
  }
  info.data_begin = offsets[0];
  info.data_end = offsets[1];
  const std::string range = absl::StrCat("data_offsets [", offsets[0], ", ", offsets[1], "]");
  if (info.data_begin > info.data_end) return TensorError(source, name, absl::StrCat(range, " are reversed"));
  if (info.data_end > data_size) {
    return TensorError(source, name,
                       absl::StrCat(range, " exceed the data section (", data_size, " bytes; file size ",
                                    file_size, ") (truncated file?)"));
  }
  if (too_big || nbytes != info.nbytes()) {
    return TensorError(
        source, name,
        absl::StrCat(range, " span ", info.nbytes(), " bytes but shape ", ShapeString(info.shape), " of ",
                     DTypeName(info.dtype), " needs ",
                     too_big ? std::string("more than the file size") : absl::StrCat(nbytes, " bytes")));
  }
  return info;
}

// Element conversion; `src` holds n little-endian elements of `dtype`, any alignment.
void ConvertToFloat32(DType dtype, const uint8_t* src, int64_t n, float* out) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, src, static_cast<size_t>(n) * 4);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = Bf16ToFloat(h);
      }
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = Fp16ToFloat(h);
      }
      return;
    default:
      return;  // callers check IsFloatConvertible first
  }
}

void ConvertFromFloat32(DType dtype, const float* src, int64_t n, uint8_t* out) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, src, static_cast<size_t>(n) * 4);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h = FloatToBf16(src[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h = FloatToFp16(src[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    default:
      return;
  }
}

absl::Status ErrnoError(absl::string_view path, absl::string_view what) {
  const int err = errno;
  std::string msg = absl::StrCat(path, ": ", what, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  return absl::InternalError(msg);
}

// A FILE* that removes its temporary file unless committed.
class TempFile {
 public:
  explicit TempFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {}
  ~TempFile() {
    if (f_) std::fclose(f_);
    if (!committed_) std::remove(tmp_.c_str());
  }
  absl::Status Open() {
    f_ = std::fopen(tmp_.c_str(), "wb");
    if (!f_) return ErrnoError(tmp_, "cannot create");
    return absl::OkStatus();
  }
  absl::Status Write(const void* data, size_t n) {
    if (n > 0 && std::fwrite(data, 1, n, f_) != n) return ErrnoError(tmp_, "write failed");
    return absl::OkStatus();
  }
  absl::Status Commit() {
    FILE* f = f_;
    f_ = nullptr;
    if (std::fclose(f) != 0) return ErrnoError(tmp_, "write failed");
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) return ErrnoError(path_, "cannot rename into place");
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  std::string path_, tmp_;
  FILE* f_ = nullptr;
  bool committed_ = false;
};

absl::Status CheckWritable(DType dtype) {
  if (!IsFloatConvertible(dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot write dtype ", DTypeName(dtype), " (only BF16, F16, F32)"));
  }
  return absl::OkStatus();
}

absl::Status CheckEntries(const std::vector<TensorEntry>& entries) {
  std::set<absl::string_view> seen;
  for (const TensorEntry& e : entries) {
    if (e.name.empty() || e.name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat("invalid tensor name \"", e.name, "\""));
    }
    if (!seen.insert(e.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", e.name, "\" is listed twice"));
    }
    for (int64_t d : e.shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor \"", e.name, "\": negative dimension in shape ", ShapeString(e.shape)));
      }
    }
  }
  return absl::OkStatus();
}

// Writes entries [first, last) to one file; `produce` is called with global indices.
absl::Status WriteRange(const std::string& path, const std::vector<TensorEntry>& entries, size_t first,
                        size_t last, DType dtype, const TensorProducer& produce) {
  const int64_t esize = DTypeSize(dtype);
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (size_t i = first; i < last; ++i) {
    const uint64_t nbytes = static_cast<uint64_t>(entries[i].numel() * esize);
    header[entries[i].name] = {{"dtype", std::string(DTypeName(dtype))},
                               {"shape", entries[i].shape},
                               {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump(-1, ' ', false, json::error_handler_t::replace);
  text.append((8 - text.size() % 8) % 8, ' ');  // data section starts 8-byte aligned
  uint8_t len[8];
  for (int b = 0; b < 8; ++b) len[b] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * b));

  TempFile out(path);
  NEEDLE_RETURN_IF_ERROR(out.Open());
  NEEDLE_RETURN_IF_ERROR(out.Write(len, 8));
  NEEDLE_RETURN_IF_ERROR(out.Write(text.data(), text.size()));
  std::vector<float> scratch;
  constexpr int64_t kChunk = 1 << 16;  // elements converted per write
  std::vector<uint8_t> buf(static_cast<size_t>(kChunk * esize));
  for (size_t i = first; i < last; ++i) {
    const int64_t n = entries[i].numel();
    NEEDLE_ASSIGN_OR_RETURN(const float* src, produce(i, scratch));
    if (n > 0 && src == nullptr) {
      return absl::InternalError(absl::StrCat(path, ": tensor \"", entries[i].name, "\": no data produced"));
    }
    if (src == scratch.data() && static_cast<int64_t>(scratch.size()) != n) {
      return absl::InternalError(absl::StrCat(path, ": tensor \"", entries[i].name, "\": produced ",
                                              scratch.size(), " values, shape needs ", n));
    }
    for (int64_t at = 0; at < n; at += kChunk) {
      const int64_t m = std::min(kChunk, n - at);
      ConvertFromFloat32(dtype, src + at, m, buf.data());
      NEEDLE_RETURN_IF_ERROR(out.Write(buf.data(), static_cast<size_t>(m * esize)));
    }
  }
  return out.Commit();
}

void RemoveIfExists(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove(path, ec);
}

}  // namespace

absl::string_view DTypeName(DType dtype) {
  for (const DTypeRow& r : kDTypes) {
    if (r.dtype == dtype) return r.name;
  }
  return "?";
}

int DTypeSize(DType dtype) {
  for (const DTypeRow& r : kDTypes) {
    if (r.dtype == dtype) return r.size;
  }
  return 1;
}

absl::StatusOr<DType> DTypeFromName(absl::string_view name) {
  for (const DTypeRow& r : kDTypes) {
    if (name == r.name) return r.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\""));
}

bool IsFloatConvertible(DType dtype) {
  return dtype == DType::kBF16 || dtype == DType::kF16 || dtype == DType::kF32;
}

absl::StatusOr<DType> ParseStorageDType(absl::string_view name) {
  if (name == "bf16" || name == "BF16" || name == "bfloat16") return DType::kBF16;
  if (name == "fp16" || name == "F16" || name == "float16") return DType::kF16;
  if (name == "fp32" || name == "F32" || name == "float32") return DType::kF32;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype \"", name, "\" (expected bf16, fp16 or fp32)"));
}

int64_t TensorInfo::numel() const {
  if (std::find(shape.begin(), shape.end(), int64_t{0}) != shape.end()) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorEntry::numel() const {
  if (std::find(shape.begin(), shape.end(), int64_t{0}) != shape.end()) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* file, size_t size,
                                                         absl::string_view source) {
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
  };
  if (size < 8) {
    return bad(
        absl::StrCat("file is ", size, " bytes, too short for the 8-byte header length (truncated file?)"));
  }
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = (n << 8) | file[b];
  if (n > kMaxSafetensorsHeaderBytes) {
    return bad(absl::StrCat("header length ", n, " exceeds the limit of ", kMaxSafetensorsHeaderBytes,
                            " bytes (not a safetensors file?)"));
  }
  if (n > size - 8) {
    return bad(absl::StrCat("header length ", n, " exceeds the file size ", size, " (truncated file?)"));
  }
  if (n < 2) return bad(absl::StrCat("header length ", n, " is too small for a JSON object"));

  const char* begin = reinterpret_cast<const char*>(file + 8);
  const char* end = begin + n;
  SyntaxCheck check;
  if (!json::sax_parse(begin, end, &check) || !check.error.empty()) {
    return bad(absl::StrCat("invalid JSON header: ", check.error.empty() ? "parse failed" : check.error));
  }
  json j = json::parse(begin, end, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return bad("invalid JSON header");
  if (!j.is_object()) return bad("JSON header is not an object");

  SafetensorsHeader header;
  header.data_start = 8 + n;
  const uint64_t data_size = size - header.data_start;
  for (const auto& [name, value] : j.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) return bad("\"__metadata__\" is not an object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string())
          return bad(absl::StrCat("\"__metadata__\" value for \"", k, "\" is not a string"));
        header.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    NEEDLE_ASSIGN_OR_RETURN(TensorInfo info, ParseEntry(source, name, value, data_size, size));
    header.tensors.push_back(std::move(info));
  }
  std::sort(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.data_begin != b.data_begin ? a.data_begin < b.data_begin : a.data_end < b.data_end;
  });
  // No two tensors may share a byte. Zero-byte tensors own none, so they never overlap.
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : header.tensors) {
    if (t.nbytes() == 0) continue;
    if (prev != nullptr && t.data_begin < prev->data_end) {
      return TensorError(source, t.name,
                         absl::StrCat("data_offsets [", t.data_begin, ", ", t.data_end, "] overlap tensor \"",
                                      prev->name, "\" [", prev->data_begin, ", ", prev->data_end, "]"));
    }
    prev = &t;
  }
  return header;
}

// ---- SafetensorsFile ----

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(path, "cannot open");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    absl::Status s = ErrnoError(path, "cannot stat");
    ::close(fd);
    return s;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    void* p = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      absl::Status s = ErrnoError(path, "mmap failed");
      ::close(fd);
      f->size_ = 0;
      return s;
    }
    f->base_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping keeps the file alive
  NEEDLE_ASSIGN_OR_RETURN(f->header_, ParseSafetensorsHeader(f->base_, f->size_, path));
  for (size_t i = 0; i < f->header_.tensors.size(); ++i) f->by_name_.emplace(f->header_.tensors[i].name, i);
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

const TensorInfo* SafetensorsFile::Find(absl::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &header_.tensors[it->second];
}

absl::Status SafetensorsFile::ReadFloat32(const TensorInfo& info, float* out) const {
  if (!IsFloatConvertible(info.dtype)) {
    return TensorError(
        path_, info.name,
        absl::StrCat("dtype ", DTypeName(info.dtype), " cannot be read as fp32 (need BF16, F16 or F32)"));
  }
  ConvertToFloat32(info.dtype, Data(info), info.numel(), out);
  return absl::OkStatus();
}

absl::Status SafetensorsFile::ReadFloat32(absl::string_view name, std::vector<int64_t>* shape,
                                          std::vector<float>* data) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no tensor \"", name, "\""));
  *shape = info->shape;
  data->assign(static_cast<size_t>(info->numel()), 0.0f);
  return ReadFloat32(*info, data->data());
}

// ---- SafetensorsCheckpoint ----

absl::StatusOr<SafetensorsCheckpoint> SafetensorsCheckpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  SafetensorsCheckpoint ckpt;
  ckpt.dir_ = dir;
  const std::string single = (fs::path(dir) / kSafetensorsSingleFile).string();
  const std::string index_path = (fs::path(dir) / kSafetensorsIndexFile).string();
  std::error_code ec;

  auto add_file = [&](std::unique_ptr<SafetensorsFile> file) -> absl::Status {
    for (const TensorInfo& t : file->tensors()) {
      auto [it, inserted] = ckpt.entries_.emplace(t.name, Entry{file.get(), &t});
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor \"", t.name, "\" is in both ",
                                                       it->second.file->path(), " and ", file->path()));
      }
    }
    ckpt.files_.push_back(std::move(file));
    return absl::OkStatus();
  };

  if (fs::exists(single, ec)) {
    NEEDLE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single));
    NEEDLE_RETURN_IF_ERROR(add_file(std::move(file)));
    return ckpt;
  }
  if (!fs::exists(index_path, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no ", kSafetensorsSingleFile, " or ",
                                            kSafetensorsIndexFile,
                                            fs::is_directory(dir, ec) ? "" : " (not a directory)"));
  }
  std::ifstream in(index_path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(index_path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  SyntaxCheck check;
  if (!json::sax_parse(text, &check) || !check.error.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": invalid JSON: ", check.error));
  }
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto wm = j.is_object() ? j.find("weight_map") : j.end();
  if (!j.is_object() || wm == j.end() || !wm->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": \"weight_map\" is missing or not an object"));
  }
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  std::set<std::string> shards;
  for (const auto& [name, shard] : wm->items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": tensor \"", name, "\": shard is not a string"));
    }
    const std::string s = shard.get<std::string>();
    if (s.empty() || s == "." || s == ".." || s.find('/') != std::string::npos ||
        s.find('\0') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor \"", name, "\": shard \"", s,
                                                     "\" is not a plain file name in the directory"));
    }
    weight_map[name] = s;
    shards.insert(s);
  }
  std::map<std::string, const SafetensorsFile*> by_shard;
  for (const std::string& s : shards) {
    NEEDLE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((fs::path(dir) / s).string()));
    by_shard[s] = file.get();
    NEEDLE_RETURN_IF_ERROR(add_file(std::move(file)));
  }
  for (const auto& [name, shard] : weight_map) {
    auto it = ckpt.entries_.find(name);
    if (it == ckpt.entries_.end() || it->second.file != by_shard[shard]) {
      return absl::NotFoundError(absl::StrCat(index_path, ": tensor \"", name, "\" is mapped to shard \"",
                                              shard, "\", which does not contain it"));
    }
  }
  return ckpt;
}

SafetensorsCheckpoint::Entry SafetensorsCheckpoint::Find(absl::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? Entry{} : it->second;
}

std::vector<std::string> SafetensorsCheckpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) names.push_back(name);
  return names;
}

// ---- Writing ----

absl::Status WriteSafetensorsFile(const std::string& path, const std::vector<TensorEntry>& entries,
                                  DType dtype, const TensorProducer& produce) {
  NEEDLE_RETURN_IF_ERROR(CheckWritable(dtype));
  NEEDLE_RETURN_IF_ERROR(CheckEntries(entries));
  return WriteRange(path, entries, 0, entries.size(), dtype, produce);
}

absl::Status WriteSafetensorsCheckpoint(const std::string& dir, const std::vector<TensorEntry>& entries,
                                        DType dtype, int64_t max_shard_bytes, const TensorProducer& produce) {
  namespace fs = std::filesystem;
  NEEDLE_RETURN_IF_ERROR(CheckWritable(dtype));
  NEEDLE_RETURN_IF_ERROR(CheckEntries(entries));
  if (max_shard_bytes < 0) return absl::InvalidArgumentError("max_shard_bytes must be >= 0");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create directory: ", ec.message()));

  // Greedy shard plan: [first, last) ranges of entries.
  std::vector<std::pair<size_t, size_t>> shards;
  std::vector<int64_t> shard_bytes;
  int64_t total = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const int64_t nbytes = entries[i].numel() * DTypeSize(dtype);
    total += nbytes;
    if (shards.empty() ||
        (max_shard_bytes > 0 && shard_bytes.back() > 0 && shard_bytes.back() + nbytes > max_shard_bytes)) {
      shards.push_back({i, i});
      shard_bytes.push_back(0);
    }
    shards.back().second = i + 1;
    shard_bytes.back() += nbytes;
  }
  const std::string single = (fs::path(dir) / kSafetensorsSingleFile).string();
  const std::string index_path = (fs::path(dir) / kSafetensorsIndexFile).string();
  if (shards.size() <= 1) {
    NEEDLE_RETURN_IF_ERROR(WriteRange(single, entries, 0, entries.size(), dtype, produce));
    RemoveIfExists(index_path);
    return absl::OkStatus();
  }
  json weight_map = json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string name = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size());
    NEEDLE_RETURN_IF_ERROR(WriteRange((fs::path(dir) / name).string(), entries, shards[s].first,
                                      shards[s].second, dtype, produce));
    for (size_t i = shards[s].first; i < shards[s].second; ++i) weight_map[entries[i].name] = name;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", std::move(weight_map)}};
  TempFile out(index_path);
  NEEDLE_RETURN_IF_ERROR(out.Open());
  const std::string text = index.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
  NEEDLE_RETURN_IF_ERROR(out.Write(text.data(), text.size()));
  NEEDLE_RETURN_IF_ERROR(out.Commit());
  RemoveIfExists(single);  // it would shadow the index
  return absl::OkStatus();
}

namespace {

std::vector<TensorEntry> EntriesOf(const std::vector<NamedTensorView>& tensors) {
  std::vector<TensorEntry> entries;
  entries.reserve(tensors.size());
  for (const NamedTensorView& t : tensors) entries.push_back({t.name, t.shape});
  return entries;
}

TensorProducer ProducerOf(const std::vector<NamedTensorView>& tensors) {
  return
      [&tensors](size_t i, std::vector<float>&) -> absl::StatusOr<const float*> { return tensors[i].data; };
}

}  // namespace

absl::Status WriteSafetensorsFile(const std::string& path, const std::vector<NamedTensorView>& tensors,
                                  DType dtype) {
  return WriteSafetensorsFile(path, EntriesOf(tensors), dtype, ProducerOf(tensors));
}

absl::Status WriteSafetensorsCheckpoint(const std::string& dir, const std::vector<NamedTensorView>& tensors,
                                        DType dtype, int64_t max_shard_bytes) {
  return WriteSafetensorsCheckpoint(dir, EntriesOf(tensors), dtype, max_shard_bytes, ProducerOf(tensors));
}

}  // namespace needle::engine
