// Thin RAII layer over the HDF5 C API: files, groups, datasets <-> torch tensors, attributes.
// Every error names the file and the object, so a bad shard or checkpoint is easy to find.
#pragma once
#include <torch/torch.h>
#include <hdf5.h>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace sedd::h5 {

// Owns one hid_t and closes it with the right H5*close.
class Handle {
 public:
  Handle() = default;
  Handle(hid_t id, herr_t (*closer)(hid_t)) : id_(id), closer_(closer) {}
  Handle(Handle&& o) noexcept { *this = std::move(o); }
  Handle& operator=(Handle&& o) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }
  void reset();
  hid_t release() {  // gives up ownership without closing
    hid_t id = id_;
    id_ = -1;
    return id;
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_ = -1;
  herr_t (*closer_)(hid_t) = nullptr;
};

enum class Mode { Read, Create /* truncate */, ReadWrite };

// An open HDF5 file; object paths are absolute ("/model/absorb_small/params").
class File {
 public:
  File(const std::string& path, Mode mode);
  const std::string& path() const { return path_; }
  hid_t id() const { return file_.get(); }

  bool exists(const std::string& obj) const;          // group or dataset
  bool is_group(const std::string& obj) const;
  std::vector<std::string> children(const std::string& group) const;  // names, sorted
  void create_group(const std::string& group);        // creates parents as needed

  // Datasets. read() converts any stored integer/float type to the tensor's natural dtype
  // (int64 for integers, float32/float64 as stored) unless `as` is given.
  torch::Tensor read(const std::string& dataset, c10::optional<torch::Dtype> as = c10::nullopt) const;
  void write(const std::string& dataset, const torch::Tensor& t, size_t chunk_elems = 0);
  // Overwrites all elements of an existing dataset (same element count), converting types.
  void overwrite(const std::string& dataset, const torch::Tensor& t);
  std::vector<int64_t> shape(const std::string& dataset) const;
  torch::Dtype stored_dtype(const std::string& dataset) const;  // kUInt16, kUInt32, kInt64, kFloat, ...
  // Reads elements [offset, offset+count) of a 1-D dataset into `out` (uint16/uint32/int64 etc.).
  void read_range(const std::string& dataset, int64_t offset, int64_t count, torch::Tensor& out) const;

  // Attributes on any object ("/" for the root).
  bool has_attr(const std::string& obj, const std::string& name) const;
  std::vector<std::string> attr_names(const std::string& obj) const;
  int64_t attr_int(const std::string& obj, const std::string& name) const;
  double attr_double(const std::string& obj, const std::string& name) const;
  std::string attr_string(const std::string& obj, const std::string& name) const;
  bool attr_is_string(const std::string& obj, const std::string& name) const;
  void set_attr(const std::string& obj, const std::string& name, int64_t v);
  void set_attr(const std::string& obj, const std::string& name, double v);
  void set_attr(const std::string& obj, const std::string& name, const std::string& v);

  void flush();
  // Flushes and closes the file, checking both: a writer calls it so that a failed write (disk
  // full, I/O error) is an error naming the file, not a silently short file. The destructor closes
  // without checking.
  void close();

 private:
  Handle open_object(const std::string& obj) const;
  std::string path_;
  Handle file_;
};

// The Debian HDF5 library is not thread-safe: every call from this layer holds this lock, so a
// prefetch thread and the main thread (checkpoints) may both use files.
std::recursive_mutex& global_mutex();
struct H5Guard {
  std::lock_guard<std::recursive_mutex> lock{global_mutex()};
};

// Silences HDF5's own stderr error stack for this process; our messages replace it.
void quiet_errors();

}  // namespace sedd::h5
