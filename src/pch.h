// Precompiled header: the torch C++ API is most of every translation unit's compile time.
#pragma once
#include <torch/torch.h>
#include <fmt/format.h>
#include <string>
#include <vector>
#include <memory>
