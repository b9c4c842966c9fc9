// HDF5 RAII layer; see hdf5.h.
#include "io/hdf5.h"

#include <algorithm>
#include <cstring>

#include "io/error.h"
#include "io/fs.h"

namespace sedd::h5 {

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = o.id_;
    closer_ = o.closer_;
    o.id_ = -1;
  }
  return *this;
}

void Handle::reset() {
  H5Guard guard;
  if (id_ >= 0 && closer_) closer_(id_);
  id_ = -1;
}

std::recursive_mutex& global_mutex() {
  static std::recursive_mutex m;
  return m;
}

void quiet_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

namespace {

// HDF5 closes the files still open at exit (H5_term_library, registered with atexit on the first
// HDF5 call). A file whose writes failed (disk full, RLIMIT_FSIZE) cannot be closed, and HDF5 1.10
// then crashes inside that exit-time cleanup (H5F__close_cb), turning one clear error into a
// segmentation fault. Every file written here is closed explicitly and checked, so the cleanup is
// turned off; it must be before any other HDF5 call, hence a static initializer.
const bool kNoExitCleanup = [] {
  H5dont_atexit();
  return true;
}();

herr_t innermost_error(unsigned n, const H5E_error2_t* e, void* out) {
  if (n == 0 && e->desc) *static_cast<std::string*>(out) = e->desc;
  return 0;
}

// Why the last HDF5 call failed, as the end of a message: the system's reason from the innermost
// entry of HDF5's error stack (": File too large", ": No space left on device"), or `guess`.
std::string failure_cause(const char* guess) {
  std::string desc;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_error, &desc);
  const std::string key = "error message = '";
  auto at = desc.find(key);
  if (at == std::string::npos) return guess;
  at += key.size();
  return ": " + desc.substr(at, desc.find('\'', at) - at);
}

}  // namespace

namespace {

hid_t native_type(torch::Dtype d) {
  switch (d) {
    case torch::kFloat: return H5T_NATIVE_FLOAT;
    case torch::kDouble: return H5T_NATIVE_DOUBLE;
    case torch::kInt64: return H5T_NATIVE_INT64;
    case torch::kInt32: return H5T_NATIVE_INT32;
    case torch::kInt16: return H5T_NATIVE_INT16;
    case torch::kUInt16: return H5T_NATIVE_UINT16;
    case torch::kUInt32: return H5T_NATIVE_UINT32;
    case torch::kUInt8: return H5T_NATIVE_UINT8;
    case torch::kInt8: return H5T_NATIVE_INT8;
    default: fail("HDF5: tensors of dtype {} cannot be stored", c10::toString(d));
  }
}

torch::Dtype dtype_of_h5type(hid_t type, const std::string& where) {
  H5T_class_t cls = H5Tget_class(type);
  size_t size = H5Tget_size(type);
  if (cls == H5T_FLOAT) {
    if (size == 4) return torch::kFloat;
    if (size == 8) return torch::kDouble;
  } else if (cls == H5T_INTEGER) {
    bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
    switch (size) {
      case 1: return is_signed ? torch::kInt8 : torch::kUInt8;
      case 2: return is_signed ? torch::kInt16 : torch::kUInt16;
      case 4: return is_signed ? torch::kInt32 : torch::kUInt32;
      case 8: return torch::kInt64;  // uint64 ids would not fit torch anyway
    }
  }
  fail("{}: unsupported HDF5 element type (class {}, {} bytes)", where, static_cast<int>(cls), size);
}

std::vector<std::string> split_path(const std::string& p) { return fs::split_nonempty(p, '/'); }

herr_t collect_name(hid_t, const char* name, const H5L_info_t*, void* out) {
  static_cast<std::vector<std::string>*>(out)->push_back(name);
  return 0;
}

herr_t collect_attr(hid_t, const char* name, const H5A_info_t*, void* out) {
  static_cast<std::vector<std::string>*>(out)->push_back(name);
  return 0;
}

}  // namespace

File::File(const std::string& path, Mode mode) : path_(path) {
  H5Guard guard;
  quiet_errors();
  hid_t id = -1;
  if (mode == Mode::Create) {
    id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    SEDD_CHECK(id >= 0, "{}: cannot create HDF5 file (is the folder there and writable?)", path);
  } else {
    FILE* probe = std::fopen(path.c_str(), "rb");
    SEDD_CHECK_INPUT(probe != nullptr, "{}: no such file", path);
    std::fclose(probe);
    SEDD_CHECK_INPUT(H5Fis_hdf5(path.c_str()) > 0, "{}: not an HDF5 file, or truncated/damaged", path);
    id = H5Fopen(path.c_str(), mode == Mode::Read ? H5F_ACC_RDONLY : H5F_ACC_RDWR, H5P_DEFAULT);
    SEDD_CHECK_INPUT(id >= 0, "{}: cannot open HDF5 file (truncated or damaged?)", path);
  }
  file_ = Handle(id, H5Fclose);
}

bool File::exists(const std::string& obj) const {
  H5Guard guard;
  if (obj == "/" || obj.empty()) return true;
  std::string cur;
  for (const auto& part : split_path(obj)) {
    cur += "/" + part;
    if (H5Lexists(id(), cur.c_str(), H5P_DEFAULT) <= 0) return false;
  }
  return true;
}

bool File::is_group(const std::string& obj) const {
  H5Guard guard;
  if (!exists(obj)) return false;
  H5O_info_t info;
  if (H5Oget_info_by_name2(id(), obj.c_str(), &info, H5O_INFO_BASIC, H5P_DEFAULT) < 0) return false;
  return info.type == H5O_TYPE_GROUP;
}

Handle File::open_object(const std::string& obj) const {
  H5Guard guard;
  SEDD_CHECK_INPUT(exists(obj), "{}: missing object '{}'", path_, obj);
  hid_t o = H5Oopen(id(), obj.c_str(), H5P_DEFAULT);
  SEDD_CHECK_INPUT(o >= 0, "{}: cannot open '{}' (damaged file?)", path_, obj);
  return Handle(o, H5Oclose);
}

std::vector<std::string> File::children(const std::string& group) const {
  H5Guard guard;
  SEDD_CHECK(is_group(group), "{}: '{}' is not a group", path_, group);
  std::vector<std::string> names;
  hsize_t idx = 0;
  herr_t rc = H5Literate_by_name(id(), group.c_str(), H5_INDEX_NAME, H5_ITER_INC, &idx,
                                  collect_name, &names, H5P_DEFAULT);
  SEDD_CHECK(rc >= 0, "{}: cannot list group '{}'", path_, group);
  std::sort(names.begin(), names.end());
  return names;
}

void File::create_group(const std::string& group) {
  H5Guard guard;
  std::string cur;
  for (const auto& part : split_path(group)) {
    cur += "/" + part;
    if (H5Lexists(id(), cur.c_str(), H5P_DEFAULT) > 0) continue;
    hid_t g = H5Gcreate2(id(), cur.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    SEDD_CHECK(g >= 0, "{}: cannot create group '{}'", path_, cur);
    H5Gclose(g);
  }
}

std::vector<int64_t> File::shape(const std::string& dataset) const {
  H5Guard guard;
  SEDD_CHECK_INPUT(exists(dataset), "{}: missing dataset '{}'", path_, dataset);
  Handle ds(H5Dopen2(id(), dataset.c_str(), H5P_DEFAULT), H5Dclose);
  SEDD_CHECK_INPUT(ds.valid(), "{}: '{}' is not a dataset (or is damaged)", path_, dataset);
  Handle space(H5Dget_space(ds.get()), H5Sclose);
  int rank = H5Sget_simple_extent_ndims(space.get());
  SEDD_CHECK(rank >= 0, "{}: cannot read the shape of '{}'", path_, dataset);
  std::vector<hsize_t> dims(rank);
  H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  return std::vector<int64_t>(dims.begin(), dims.end());
}

torch::Dtype File::stored_dtype(const std::string& dataset) const {
  H5Guard guard;
  SEDD_CHECK_INPUT(exists(dataset), "{}: missing dataset '{}'", path_, dataset);
  Handle ds(H5Dopen2(id(), dataset.c_str(), H5P_DEFAULT), H5Dclose);
  SEDD_CHECK_INPUT(ds.valid(), "{}: '{}' is not a dataset (or is damaged)", path_, dataset);
  Handle type(H5Dget_type(ds.get()), H5Tclose);
  return dtype_of_h5type(type.get(), path_ + ":" + dataset);
}

torch::Tensor File::read(const std::string& dataset, c10::optional<torch::Dtype> as) const {
  H5Guard guard;
  auto dims = shape(dataset);
  torch::Dtype stored = stored_dtype(dataset);
  torch::Dtype want = as ? *as
                         : (c10::isIntegralType(stored, /*includeBool=*/false) ? torch::kInt64 : stored);
  torch::Tensor out = torch::empty(dims, torch::TensorOptions().dtype(want));
  Handle ds(H5Dopen2(id(), dataset.c_str(), H5P_DEFAULT), H5Dclose);
  if (out.numel() > 0) {
    herr_t rc = H5Dread(ds.get(), native_type(want), H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data_ptr());
    SEDD_CHECK_INPUT(rc >= 0, "{}: cannot read dataset '{}' (truncated or damaged file?)", path_, dataset);
  }
  return out;
}

void File::read_range(const std::string& dataset, int64_t offset, int64_t count, torch::Tensor& out) const {
  H5Guard guard;
  SEDD_CHECK(out.is_contiguous() && out.numel() >= count, "read_range: output buffer too small");
  Handle ds(H5Dopen2(id(), dataset.c_str(), H5P_DEFAULT), H5Dclose);
  SEDD_CHECK_INPUT(ds.valid(), "{}: missing dataset '{}'", path_, dataset);
  Handle file_space(H5Dget_space(ds.get()), H5Sclose);
  hsize_t start = offset, n = count;
  H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &start, nullptr, &n, nullptr);
  Handle mem_space(H5Screate_simple(1, &n, nullptr), H5Sclose);
  herr_t rc = H5Dread(ds.get(), native_type(out.scalar_type()), mem_space.get(), file_space.get(),
                      H5P_DEFAULT, out.data_ptr());
  SEDD_CHECK_INPUT(rc >= 0, "{}: cannot read '{}' at offset {} (truncated or damaged file?)", path_, dataset,
                   offset);
}

void File::write(const std::string& dataset, const torch::Tensor& t_in, size_t chunk_elems) {
  H5Guard guard;
  torch::Tensor t = t_in.detach().to(torch::kCPU).contiguous();
  auto slash = dataset.rfind('/');
  if (slash != std::string::npos && slash > 0) create_group(dataset.substr(0, slash));
  std::vector<hsize_t> dims(t.sizes().begin(), t.sizes().end());
  Handle space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  if (chunk_elems > 0 && dims.size() == 1 && dims[0] > 0) {
    hsize_t chunk = std::min<hsize_t>(chunk_elems, dims[0]);
    H5Pset_chunk(dcpl.get(), 1, &chunk);
  }
  hid_t type = native_type(t.scalar_type());
  Handle ds(H5Dcreate2(id(), dataset.c_str(), type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
            H5Dclose);
  SEDD_CHECK(ds.valid(), "{}: cannot create dataset '{}' (exists already?)", path_, dataset);
  if (t.numel() > 0) {
    SEDD_CHECK(H5Dwrite(ds.get(), type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) >= 0,
               "{}: cannot write dataset '{}'{}", path_, dataset, failure_cause(" (disk full?)"));
  }
}

void File::overwrite(const std::string& dataset, const torch::Tensor& t_in) {
  H5Guard guard;
  torch::Tensor t = t_in.detach().to(torch::kCPU).contiguous();
  int64_t n = 1;
  for (auto d : shape(dataset)) n *= d;
  SEDD_CHECK(n == t.numel(), "{}: '{}' has {} elements, cannot overwrite with {}", path_, dataset, n, t.numel());
  Handle ds(H5Dopen2(id(), dataset.c_str(), H5P_DEFAULT), H5Dclose);
  SEDD_CHECK(H5Dwrite(ds.get(), native_type(t.scalar_type()), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) >= 0,
             "{}: cannot overwrite dataset '{}'", path_, dataset);
}

bool File::has_attr(const std::string& obj, const std::string& name) const {
  H5Guard guard;
  if (!exists(obj)) return false;
  return H5Aexists_by_name(id(), obj.c_str(), name.c_str(), H5P_DEFAULT) > 0;
}

std::vector<std::string> File::attr_names(const std::string& obj) const {
  H5Guard guard;
  Handle o = open_object(obj);
  std::vector<std::string> names;
  hsize_t idx = 0;
  H5Aiterate2(o.get(), H5_INDEX_NAME, H5_ITER_INC, &idx, collect_attr, &names);
  return names;
}

namespace {
Handle open_attr(const File& f, const std::string& obj, const std::string& name) {
  H5Guard guard;
  SEDD_CHECK_INPUT(f.has_attr(obj, name), "{}: '{}' has no attribute '{}'", f.path(), obj, name);
  hid_t a = H5Aopen_by_name(f.id(), obj.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT);
  SEDD_CHECK(a >= 0, "{}: cannot open attribute '{}' of '{}'", f.path(), name, obj);
  return Handle(a, H5Aclose);
}
}  // namespace

int64_t File::attr_int(const std::string& obj, const std::string& name) const {
  H5Guard guard;
  Handle a = open_attr(*this, obj, name);
  Handle type(H5Aget_type(a.get()), H5Tclose);
  H5T_class_t cls = H5Tget_class(type.get());
  if (cls == H5T_FLOAT) {
    double v = attr_double(obj, name);
    SEDD_CHECK(v == static_cast<double>(static_cast<int64_t>(v)),
               "{}: attribute '{}' of '{}' must be an integer, found {}", path_, name, obj, v);
    return static_cast<int64_t>(v);
  }
  int64_t v = 0;
  SEDD_CHECK(H5Aread(a.get(), H5T_NATIVE_INT64, &v) >= 0,
             "{}: attribute '{}' of '{}' is not an integer", path_, name, obj);
  return v;
}

double File::attr_double(const std::string& obj, const std::string& name) const {
  H5Guard guard;
  Handle a = open_attr(*this, obj, name);
  double v = 0;
  SEDD_CHECK(H5Aread(a.get(), H5T_NATIVE_DOUBLE, &v) >= 0,
             "{}: attribute '{}' of '{}' is not a number", path_, name, obj);
  return v;
}

bool File::attr_is_string(const std::string& obj, const std::string& name) const {
  H5Guard guard;
  Handle a = open_attr(*this, obj, name);
  Handle type(H5Aget_type(a.get()), H5Tclose);
  return H5Tget_class(type.get()) == H5T_STRING;
}

std::string File::attr_string(const std::string& obj, const std::string& name) const {
  H5Guard guard;
  Handle a = open_attr(*this, obj, name);
  Handle type(H5Aget_type(a.get()), H5Tclose);
  SEDD_CHECK(H5Tget_class(type.get()) == H5T_STRING, "{}: attribute '{}' of '{}' is not a string",
             path_, name, obj);
  if (H5Tis_variable_str(type.get()) > 0) {
    char* s = nullptr;
    Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.get(), H5T_VARIABLE);
    H5Tset_cset(mem.get(), H5Tget_cset(type.get()));
    SEDD_CHECK(H5Aread(a.get(), mem.get(), &s) >= 0, "{}: cannot read attribute '{}'", path_, name);
    std::string out = s ? s : "";
    H5free_memory(s);
    return out;
  }
  size_t n = H5Tget_size(type.get());
  std::string out(n, '\0');
  SEDD_CHECK(H5Aread(a.get(), type.get(), out.data()) >= 0, "{}: cannot read attribute '{}'", path_, name);
  out.resize(std::strlen(out.c_str()));
  return out;
}

namespace {
void write_attr(File& f, const std::string& obj, const std::string& name, hid_t type, const void* v) {
  H5Guard guard;
  if (f.has_attr(obj, name)) H5Adelete_by_name(f.id(), obj.c_str(), name.c_str(), H5P_DEFAULT);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  hid_t a = H5Acreate_by_name(f.id(), obj.c_str(), name.c_str(), type, space.get(), H5P_DEFAULT,
                              H5P_DEFAULT, H5P_DEFAULT);
  SEDD_CHECK(a >= 0, "{}: cannot create attribute '{}' on '{}'", f.path(), name, obj);
  Handle attr(a, H5Aclose);
  SEDD_CHECK(H5Awrite(a, type, v) >= 0, "{}: cannot write attribute '{}'", f.path(), name);
}
}  // namespace

void File::set_attr(const std::string& obj, const std::string& name, int64_t v) {
  H5Guard guard;
  write_attr(*this, obj, name, H5T_NATIVE_INT64, &v);
}
void File::set_attr(const std::string& obj, const std::string& name, double v) {
  H5Guard guard;
  write_attr(*this, obj, name, H5T_NATIVE_DOUBLE, &v);
}
void File::set_attr(const std::string& obj, const std::string& name, const std::string& v) {
  H5Guard guard;
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  const char* s = v.c_str();
  write_attr(*this, obj, name, type.get(), &s);
}

void File::flush() {
  H5Guard guard;
  SEDD_CHECK(H5Fflush(id(), H5F_SCOPE_GLOBAL) >= 0, "{}: flushing the HDF5 file failed{}", path_,
             failure_cause(" (disk full?)"));
}

void File::close() {
  H5Guard guard;
  if (!file_.valid()) return;
  flush();
  hid_t id = file_.release();  // H5Fclose's result is checked here, not ignored by the handle
  SEDD_CHECK(H5Fclose(id) >= 0, "{}: closing the HDF5 file failed{}", path_,
             failure_cause(" (disk full or I/O error?)"));
}

}  // namespace sedd::h5
