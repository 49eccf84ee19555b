"""Scoring script for a managed online endpoint serving a model registered by finetune (custom_model).

Azure ML calls init() once per worker, with AZUREML_MODEL_DIR pointing at the registered model's files,
then run(raw_data) per request. The model is served exactly as plain transformers loads the export:
its tokenizer renders the chat template embedded in it, and generation stops at the end-of-turn token
its generation_config.json names. Deployment: docs/azureml.md, "Deploy the registered model".

Request:  {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_new_tokens": 128,
           "temperature": 0.0}          (or "prompt": "..." for one user turn; temperature 0 = greedy)
Response: {"reply": "5", "finish_reason": "stop" | "length", "usage": {"prompt_tokens": N, "completion_tokens": M}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = tokenizer = None


def model_folder(root: str | Path) -> Path:
    """The folder with config.json under the registered model's root (Azure ML puts the registered
    folder, under its own name, inside AZUREML_MODEL_DIR)."""
    root = Path(root)
    if (root / "config.json").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise FileNotFoundError(f"no config.json under {root}: not a model registered from a finetune export")
    return found[0]


def init():
    global model, tokenizer
    folder = model_folder(os.environ["AZUREML_MODEL_DIR"])
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype="auto" if cuda else torch.float32, device_map="auto" if cuda else None
    ).eval()


@torch.no_grad()
def run(raw_data: str) -> dict:
    request = json.loads(raw_data)
    request = request.get("input_data", request)  # the shape the studio's test tab sends
    messages = request.get("messages") or [{"role": "user", "content": request["prompt"]}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    temperature = float(request.get("temperature", 0.0))
    max_new = int(request.get("max_new_tokens", 128))
    out = model.generate(
        **inputs,
        max_new_tokens=max_new,
        do_sample=temperature > 0,
        **({"temperature": temperature} if temperature > 0 else {}),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    new = out[0, inputs["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    stopped = any(int(t) in stops for t in new)
    return {
        "reply": tokenizer.decode(new, skip_special_tokens=True).strip(),
        "finish_reason": "stop" if stopped else "length",
        "usage": {"prompt_tokens": int(inputs["input_ids"].shape[1]), "completion_tokens": int(len(new))},
    }
