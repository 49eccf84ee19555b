"""Where users take the model next: GGUF files for llama.cpp / LM Studio and an Ollama Modelfile, written
from a finished export (`finetune export RECIPE --gguf q8_0,q4_k_m`; docs/deploy.md).

Core level: the export stage calls it; it imports no stage. `gguf.write_gguf` converts and quantises with
llama.cpp's own tools, `llamacpp` runs a GGUF file for the held-out check, `ollama` writes the Modelfile.
"""
