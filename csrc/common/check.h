#pragma once
#include <stdexcept>
#include <string>

// Argument checks at the native boundary. std::invalid_argument becomes ValueError in Python (pybind11),
// so a bad shape or dtype never reaches a kernel. The message names the argument, as the Python layer does.
#define FF_CHECK_ARG(cond, arg, msg)                                                       \
  do {                                                                                     \
    if (!(cond)) throw std::invalid_argument(std::string(arg) + ": " + std::string(msg));  \
  } while (0)
