"""Greedy generation with vAttention in a HuggingFace model, with per-layer statistics.

    python3 python/examples/hf_generate.py                      # a tiny random Llama, built here
    python3 python/examples/hf_generate.py --model PATH --prompt-file long.txt

Prints the tokens generated densely and with vattn, whether they agree, and per layer the mean
density, budget b, residual size n_s, the estimated error and the measured error against exact
attention (share of heads above eps too).
"""

import argparse
import time

import torch
import transformers

import vattn
import vattn.hf


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
        attention_bias=True, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # values with a common offset, as trained models' often have
        for layer in model.model.layers:
            layer.self_attn.v_proj.bias.normal_(0, 0.5)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a local HF model directory (default: a tiny random Llama)")
    ap.add_argument("--prompt-file", help="text file for the prompt (with --model)")
    ap.add_argument("--tokens", type=int, default=8192, help="random prompt length (tiny model)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--config", default="method=vattention,eps=0.05,delta=0.05,mode=output",
                    help="vattn config text (see vattn.Config)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.model:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
        text = open(args.prompt_file).read() if args.prompt_file else "Hello " * args.tokens
        ids = tok(text, return_tensors="pt").input_ids
    else:
        tok, model = None, tiny_llama(args.seed)
        ids = torch.randint(3, 256, (1, args.tokens), generator=torch.Generator().manual_seed(1))

    def generate():
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        return out[0, ids.shape[1]:], time.perf_counter() - t

    dense, t_dense = generate()
    cfg = vattn.Config.parse(args.config)
    run = vattn.hf.enable(model, cfg, collect=True, errors=True)
    sparse, t_sparse = generate()
    run.disable()

    show = (lambda t: repr(tok.decode(t))) if tok else (lambda t: t.tolist())
    print(f"prompt: {ids.shape[1]} tokens; config: {cfg}")
    print(f"dense : {show(dense)}  ({t_dense:.2f} s)")
    print(f"vattn : {show(sparse)}  ({t_sparse:.2f} s, includes measuring errors)")
    agree = int((dense == sparse).cumprod(0).sum())
    print(f"tokens agreeing from the start: {agree} of {len(dense)}")
    print("layer  steps  density   mean b    n_s   est.err  err.mean  err.max  above eps")
    for r in run.summary():
        print(f"{r['layer']:5d}  {r['steps']:5d}  {r['density']:7.3f}  {r['b']:7.0f}  "
              f"{r['n_s']:6.0f}  {r['est_rel_error']:7.4f}  {r['error_mean']:8.4f}  "
              f"{r['error_max']:7.4f}  {r.get('above_eps', float('nan')):9.3f}")


if __name__ == "__main__":
    main()
