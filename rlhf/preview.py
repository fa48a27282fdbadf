"""`rlhf preview`: the first training examples exactly as the model will see them, and what usually goes wrong.

Most fine-tuning bugs raise no error: a missing EOS teaches the model never to stop, a double BOS or a prompt
tokenized differently at generation time shifts everything it learned. Looking at the tokens before training is the
cheapest check there is.
"""

from __future__ import annotations

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.data import SftData, load_sft_data, tokenize_blocks, tokenize_examples
from rlhf.resolve import resolve_model

SHOWN_TOKENS = 64


def _token_view(tokenizer, ids: list[int], labels: list[int], limit: int) -> list[str]:
    lines = []
    for pos, (tok, lab) in enumerate(zip(ids[:limit], labels[:limit])):
        piece = tokenizer.decode([tok])
        # Position 0 is never predicted: a causal LM's loss starts at the second token.
        counted = "loss" if lab != -100 and pos > 0 else "-"
        special = " (EOS)" if tok == tokenizer.eos_token_id else " (BOS)" if tok == tokenizer.bos_token_id else ""
        lines.append(f"  {pos:>4}  {tok:>6}  {piece!r:<20} {counted}{special}")
    return lines


def check(tokenizer, texts: list[str], blocks, recipe: Recipe) -> list[str]:
    """Warnings for the usual tokenization mistakes, each with what to do about it."""
    warnings = []
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    plain = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    default = tokenizer(texts[0])["input_ids"]
    if eos is None:
        warnings.append("the tokenizer has no EOS token: the model cannot learn where a document ends")
    elif not any(eos in ids for ids in blocks.input_ids) and recipe.sft.pack:
        warnings.append("no EOS in the shown blocks: documents are longer than a block (fine) or EOS is missing")
    if blocks.n_truncated:
        warnings.append(
            f"{blocks.n_truncated} of {blocks.n_documents} documents are longer than sft.block_size="
            f"{recipe.sft.block_size} and lose their end (and EOS); raise block_size or set sft.pack=true"
        )
    if bos is not None and default[:2] == [bos, bos]:
        warnings.append("double BOS: the text already starts with BOS and the tokenizer adds another")
    if tokenizer.pad_token_id == eos and not recipe.sft.pack:
        lost = sum(
            1
            for ids, labs in zip(blocks.input_ids, blocks.labels)
            for t, lab in zip(ids, labs)
            if t == eos and lab == -100
        )
        counted = sum(
            1
            for ids, labs in zip(blocks.input_ids, blocks.labels)
            for t, lab in zip(ids, labs)
            if t == eos and lab != -100
        )
        if counted == 0 and lost:
            warnings.append("pad == EOS and every EOS is masked out of the loss: the model will never learn to stop")
    # PPO prompts are the first tokens of a document as training tokenized it; a tokenizer that adds special tokens
    # at generation time (BOS, a chat template) would show the model a prompt it never saw in training.
    if default[: len(plain)] != plain or len(default) != len(plain):
        extra = [tokenizer.decode([t]) for t in default if t not in plain][:3]
        warnings.append(
            f"the tokenizer adds special tokens by default ({extra}); training uses add_special_tokens=False, so build "
            f"generation prompts the same way"
        )
    return warnings


def task_checks(blocks, recipe: Recipe) -> list[str]:
    """Warnings for prompt-completion pairs and conversations."""
    warnings = []
    if blocks.n_truncated:
        warnings.append(
            f"{blocks.n_truncated} of {blocks.n_documents} examples are longer than sft.block_size="
            f"{recipe.sft.block_size} and lose their end; raise block_size"
        )
    if blocks.n_dropped:
        warnings.append(f"{blocks.n_dropped} examples have no token to learn from within the block and are left out")
    if blocks.n_prompt_merged:
        warnings.append(
            f"in {blocks.n_prompt_merged} examples the prompt's last tokens merge with the completion's first (or the "
            "template renders the prompt alone differently): training sees a prompt end that generation will not; end "
            "prompts on a token boundary (e.g. a space or newline at the start of the completion, not the prompt's end)"
        )
    return warnings


def main(recipe: Recipe, n: int) -> None:
    model_dir = resolve_model(recipe.model.name, recipe.model.revision)
    tokenizer = modeling.load_tokenizer(model_dir, recipe.model.trust_remote_code, recipe.model.chat_template)
    data = load_sft_data(recipe.data, recipe.data.train_split)
    if data.format != "text":
        _main_task(recipe, tokenizer, data, n)
        return
    texts = data.rows
    # Enough documents to fill n blocks; tokenizing the whole dataset just to show a few would be slow.
    sample, blocks = texts[: max(n, 1)], None
    while True:
        try:
            blocks = tokenize_blocks(sample, tokenizer, recipe.sft.block_size, recipe.sft.pack)
        except Exception:
            blocks = None
        if (blocks is not None and len(blocks) >= n) or len(sample) == len(texts):
            break
        sample = texts[: len(sample) * 2]
    if blocks is None:
        blocks = tokenize_blocks(sample, tokenizer, recipe.sft.block_size, recipe.sft.pack)

    print(f"preview: {recipe.data.dataset} [{recipe.data.train_split}] -> {recipe.model.name} tokenizer")
    print(
        f"  {'packed' if recipe.sft.pack else 'one document per block'}, block_size {recipe.sft.block_size}, "
        f"EOS id {tokenizer.eos_token_id} ({tokenizer.eos_token!r}), BOS id {tokenizer.bos_token_id}, "
        f"pad id {tokenizer.pad_token_id}"
    )
    for i in range(min(n, len(blocks))):
        ids, labels, mask = blocks.input_ids[i], blocks.labels[i], blocks.attention_mask[i]
        n_real = sum(mask)
        n_loss = sum(1 for pos, lab in enumerate(labels) if lab != -100 and pos > 0)
        print(f"\n=== example {i}: {len(ids)} tokens, {n_real} real, {n_loss} counted in the loss")
        print("text:", repr(tokenizer.decode(ids[:n_real])[:600]))
        print("ids: ", ids[:SHOWN_TOKENS], "..." if len(ids) > SHOWN_TOKENS else "")
        print("   pos      id  token                in loss")
        print("\n".join(_token_view(tokenizer, ids, labels, SHOWN_TOKENS)))
        if len(ids) > SHOWN_TOKENS:
            print(f"  ... {len(ids) - SHOWN_TOKENS} more")
    warnings = check(tokenizer, sample, blocks, recipe)
    print()
    for w in warnings:
        print(f"warning: {w}")
    if not warnings:
        print("checks: EOS ends each document, no truncation, no double BOS, prompts tokenized as in training: ok")


def _main_task(recipe: Recipe, tokenizer, data: SftData, n: int) -> None:
    """Prompt-completion pairs or conversations: each example with the tokens that count in the loss marked."""
    examples = tokenize_examples(data, tokenizer, recipe.sft.block_size)
    what = "the completion" if data.format == "prompt-completion" else "the assistant turns"
    print(f"preview: {recipe.data.dataset} [{recipe.data.train_split}] -> {recipe.model.name} tokenizer")
    print(
        f"  {data.format} rows: one example each, up to sft.block_size {recipe.sft.block_size} tokens; the loss counts "
        f"{what} only (TRL's completion-only / assistant-only loss); EOS id {tokenizer.eos_token_id} "
        f"({tokenizer.eos_token!r})"
    )
    for i in range(min(n, len(examples))):
        ids, labels = examples.input_ids[i], examples.labels[i]
        counted = [t for pos, (t, lab) in enumerate(zip(ids, labels)) if lab != -100 and pos > 0]
        print(f"\n=== example {i}: {len(ids)} tokens, {len(counted)} counted in the loss")
        print("text:   ", repr(tokenizer.decode(ids)[:600]))
        print("counted:", repr(tokenizer.decode(counted)))
        print("   pos      id  token                in loss")
        print("\n".join(_token_view(tokenizer, ids, labels, SHOWN_TOKENS)))
        if len(ids) > SHOWN_TOKENS:
            print(f"  ... {len(ids) - SHOWN_TOKENS} more")
    warnings = task_checks(examples, recipe)
    print()
    for w in warnings:
        print(f"warning: {w}")
    if not warnings:
        print("checks: no example cut by the block, each has tokens to learn, prompts end on a token boundary: ok")
