#!/usr/bin/env python3
"""Writes the committed seed corpora of the fuzz targets (fuzz/corpus/<target>/).

    fuzz/make_seeds.py --needle-model build/tools/needle-model

Seeds are small on purpose (libFuzzer's -max_len follows the largest seed):
  safetensors_header  hand-built files: valid ones (every dtype, metadata, empty and zero-size
                      tensors, holes, the writer's space padding) and near misses (overlaps, reversed
                      or out-of-file offsets, bad length fields, bad JSON);
  model_config        every preset's config.json as needle writes it (`needle-model info`, minus its
                      "needle" summary), plus Hugging Face style variants and near misses;
  generate_request    GenerateRequest messages in text format, encoded with protoc.
Needs python3 and protoc (both installed by scripts/setup.sh). Re-running rewrites the same files.
"""
import argparse
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    path = os.path.join(ROOT, "corpus", target, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(header, data=b"", pad=True, length=None):
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def safetensors_seeds():
    t = "safetensors_header"
    meta = {"__metadata__": {"format": "pt"}}
    write(t, "valid_two_tensors", safetensors(
        {**meta, "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]}}, bytes(range(28))))
    sizes = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
    header, offset = {}, 0
    for name, size in sizes.items():
        header["t_" + name.lower()] = {"dtype": name, "shape": [2], "data_offsets": [offset, offset + 2 * size]}
        offset += 2 * size
    write(t, "valid_every_dtype", safetensors(header, bytes(offset)))
    write(t, "valid_zero_size_and_hole", safetensors(
        {"empty": {"dtype": "F32", "shape": [0, 5], "data_offsets": [4, 4]},
         "scalar": {"dtype": "F16", "shape": [], "data_offsets": [8, 10]},
         "late": {"dtype": "U8", "shape": [3], "data_offsets": [12, 15]}}, bytes(16)))
    write(t, "valid_empty_header", safetensors({}))
    write(t, "valid_unpadded", safetensors({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}},
                                           bytes(8), pad=False))
    write(t, "bad_overlap", safetensors(
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
         "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, bytes(8)))
    write(t, "bad_reversed_offsets", safetensors({"a": {"dtype": "U8", "shape": [2], "data_offsets": [4, 2]}},
                                                 bytes(8)))
    write(t, "bad_offsets_past_end", safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                                 bytes(8)))
    write(t, "bad_shape_mismatch", safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}},
                                               bytes(16)))
    write(t, "bad_negative_dim", safetensors({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                                             bytes(4)))
    write(t, "bad_huge_dims", safetensors(
        {"a": {"dtype": "F64", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}}, bytes(8)))
    write(t, "bad_length_past_file", safetensors({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
                                                 b"\0", length=4096))
    write(t, "bad_json", struct.pack("<Q", 12) + b'{"a": {"dty' + b"\0")
    dup = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    write(t, "bad_duplicate_key", struct.pack("<Q", len(dup)) + dup + b"\0")
    write(t, "bad_metadata_value", safetensors({"__metadata__": {"k": 3}}))
    write(t, "bad_short", b"\x10\0\0")


def model_config_seeds(needle_model):
    t = "model_config"
    presets = ["demo", "tiny-nsa", "tiny-llama-nsa", "tiny-nsa-paper", "tiny-llama", "tiny-nsa-qkvbias",
               "tiny-llama-tied", "paper-nsa", "fla-nsa"]
    for p in presets:
        out = subprocess.run([needle_model, "info", "--model", p], check=True, capture_output=True, text=True).stdout
        config = json.loads(out)
        config.pop("needle", None)
        write(t, "preset_" + p, json.dumps(config, indent=1, sort_keys=True))
    hf_llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
                "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "rope_scaling": None, "max_position_embeddings": 4096,
                "bos_token_id": 1, "eos_token_id": [2, 3], "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
    write(t, "hf_llama_eos_list", json.dumps(hf_llama))
    write(t, "hf_llama_rope_parameters", json.dumps(
        {**hf_llama, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))
    fla_nsa = {"model_type": "nsa", "hidden_size": 128, "num_hidden_layers": 2, "num_heads": 8,
               "num_kv_heads": None, "block_size": 32, "block_counts": 5, "window_size": 64,
               "max_position_embeddings": 8192, "hidden_ratio": 4, "intermediate_size": None}
    write(t, "fla_nsa_nulls", json.dumps(fla_nsa))
    write(t, "bad_heads", json.dumps({**hf_llama, "num_key_value_heads": 3}))
    write(t, "bad_rope_scaling", json.dumps({**hf_llama, "rope_scaling": {"type": "linear", "factor": 2}}))
    write(t, "bad_not_object", "[1, 2, 3]")
    write(t, "bad_types", json.dumps({**hf_llama, "hidden_size": "64", "rms_norm_eps": [1e-5]}))


def generate_request_seeds():
    t = "generate_request"
    proto_dir = os.path.join(os.path.dirname(ROOT), "proto")
    requests = {
        "ids_greedy": 'request_id: "r1" token_ids { ids: [72, 105, 33] } sampling { temperature: 0 } '
                      'stopping { max_tokens: 8 ignore_eos: true }',
        "text_sampled": 'text: "Once upon a time" sampling { temperature: 0.8 top_p: 0.95 top_k: 40 min_p: 0.05 '
                        'seed: 7 } stopping { max_tokens: 16 stop: ["\\n", "The end"] stop_token_ids: [257] }',
        "penalties_logprobs": 'token_ids { ids: [1, 2, 3, 4, 5] } sampling { repetition_penalty: 1.3 '
                              'presence_penalty: 0.5 frequency_penalty: -0.5 } return_logprobs: true top_logprobs: 5',
        "unset_everything": 'text: "x"',
        "bad_temperature": 'text: "hi" sampling { temperature: -1 }',
        "bad_top_p": 'text: "hi" sampling { top_p: 1.5 }',
        "bad_max_tokens_context": 'token_ids { ids: [65] } stopping { max_tokens: 4294967295 }',
        "bad_vocab": 'token_ids { ids: [65, 300] }',
        "bad_stop_strings": 'text: "hi" stopping { stop: ["", "a"] }',
        "bad_top_logprobs": 'text: "hi" return_logprobs: true top_logprobs: 21',
        "no_input": 'sampling { temperature: 0 }',
    }
    for name, text in requests.items():
        data = subprocess.run(["protoc", "-I", proto_dir, "--encode=needle.v1.GenerateRequest",
                               "needle/v1/generation.proto"], input=text.encode(), check=True,
                              capture_output=True).stdout
        write(t, name, data)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--needle-model", required=True, help="path of the built needle-model")
    args = parser.parse_args()
    safetensors_seeds()
    model_config_seeds(args.needle_model)
    generate_request_seeds()
    return 0


if __name__ == "__main__":
    sys.exit(main())
