# Included by llama.cpp's own CMakeLists right after its project() call (CMAKE_PROJECT_llama.cpp_INCLUDE, set by
# tests/setup/runtimes.sh): llama-cpp-python forces llama.cpp's `common` library on, which its Python package never
# loads and which is 57 of the build's 141 compile steps (argument parsing, chat parsers, an HTTP client).
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp common library: not used by llama-cpp-python" FORCE)
