"""The Encoder with tokenizers other than the byte tokenizer: SmolLM2's byte-level BPE, Gemma 3's SentencePiece (no
dummy prefix) and a LLaMA-style SentencePiece with a dummy prefix, trained here (nothing downloaded).

The reference is always computed another way: the filled template with its tags removed, tokenized whole (or
decoded), and for SmolLM2 and Gemma the pieces tokenized one by one as the Encoder did before version 2.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml

from tagscale.runtime import embedded
from tagscale.config import TAG_NAME, TaskConfig
from tagscale.data.encode import Encoder, fill
from tagscale.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECORD = {"smiles": "CC(=O)Oc1ccccc1", "seq": "MKTAYIAK", "text": "the value is", "src": "the water ring",
          "tgt": "la molecule"}
# Tags where a whole text has a token boundary anyway (after a non-space, before a space, a newline or a field
# that starts a word), so the tag-free text tokenized whole is the exact reference, for every tokenizer here.
BOUNDARY_TEMPLATES = [
    "The value is:<Score>\n# # Output: the score is<QED>",
    "<Text> {text}.<Score>\nthe molecule",
    "Input:<EN>\nthe {src}<Translate> output",
]


def recipe_templates() -> list[tuple[str, str | None]]:
    """(template, target) of every task in the shipped recipes: what the committed runs encode."""
    out = []
    for path in sorted((ROOT / "tagscale" / "recipes").glob("*.yaml")):
        for task in yaml.safe_load(path.read_text())["tasks"]:
            out.append((task["template"], task.get("target")))
    return sorted(set(out), key=str)


def train_sentencepiece(folder: Path, **options) -> Path:
    """A tiny byte-fallback BPE with a dummy prefix, like LLaMA-2's and Mistral's, on generated text."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = "the molecule of protein sequence is input output score value smiles water carbon ring la".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", ":", " CCO", " 1.5"])
             for _ in range(400)]
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=400, model_type="bpe", add_dummy_prefix=True, byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
                                   **options)
    return folder


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded.cached_tokenizer_folder("smollm2-135m-instruct", embedded.smollm2_gguf))


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded.cached_tokenizer_folder("gemma3-270m", embedded.gemma3_gguf))


@pytest.fixture(scope="module")
def qwen_05b():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        embedded.cached_tokenizer_folder("qwen2.5-coder-0.5b-instruct", embedded.qwen_coder_05b_gguf))


@pytest.fixture(scope="module")
def qwen_15b():
    """The 1.5B base's tokenizer alone (converted from the GGUF header: no weight is dequantized)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        embedded.cached_tokenizer_folder("qwen2.5-coder-1.5b-instruct", embedded.qwen_coder_15b_gguf))


def llama(folder: Path, legacy: bool):
    """The SentencePiece model as transformers loads LLaMA's tokenizer.model: legacy (a "▁" after every special
    token) or not; with a BOS, as LLaMA-2 and Mistral add one."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(folder, legacy=legacy, add_bos_token=True)


@pytest.fixture(scope="module", params=["smollm2", "gemma", "qwen_05b", "qwen_15b", "sp-legacy", "sp"])
def tokenizer(request, sp_folder):
    if request.param.startswith("sp"):
        return llama(sp_folder, legacy=request.param == "sp-legacy")
    return request.getfixturevalue(request.param)


def encoder_for(tokenizer) -> Encoder:
    # every tag of the templates here, two placeholder ids each, past the vocabulary as the tag bank's are
    tags = sorted({tag for template, _ in recipe_templates() for tag in TAG_NAME.findall(template)}
                  | {tag for template in BOUNDARY_TEMPLATES for tag in TAG_NAME.findall(template)})
    rows = len(tokenizer)
    placeholders = {tag: [rows + 2 * i, rows + 2 * i + 1] for i, tag in enumerate(tags)}
    return Encoder(tokenizer, placeholders, set(tags), [], 512)


def text_ids(encoder: Encoder, ids: list[int], is_tag: list[bool]) -> list[int]:
    return [i for i, tag in zip(ids, is_tag) if not tag and i not in encoder.bos]


def whole(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def untagged(template: str) -> str:
    return TAG_NAME.sub("", fill(template, RECORD))


# Qwen2's BPE merges ":\n" and ".\n" into one token, so its whole text has no boundary where these templates' tags
# sit; for it, as for every byte-level BPE, the reference is each piece tokenized alone (the test after the next).
@pytest.mark.parametrize("tokenizer", ["smollm2", "gemma", "sp-legacy", "sp"], indirect=True)
@pytest.mark.parametrize("template", BOUNDARY_TEMPLATES)
def test_text_around_tags_is_the_whole_text_tokenized(tokenizer, template):
    encoder = encoder_for(tokenizer)
    ids, is_tag, _ = encoder.prompt(template, RECORD)
    assert text_ids(encoder, ids, is_tag) == whole(tokenizer, untagged(template))


def test_recipe_templates_decode_to_their_text(tokenizer):
    """Any template (spaces beside tags included): the text tokens decode to the tag-free text, no "▁" added.
    The tags' placeholders sit where the tags were; BOS once, first, when the tokenizer adds one."""
    encoder = encoder_for(tokenizer)
    strips = tokenizer.decode(whole(tokenizer, " a")) == "a"  # SentencePiece decoders drop a leading space
    bos = tokenizer.bos_token_id if tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id] else None
    for template, _ in recipe_templates():
        ids, is_tag, last = encoder.prompt(template, RECORD)
        text = text_ids(encoder, ids, is_tag)
        expected = untagged(template)
        if strips and expected.startswith(" "):  # the decoder's doing (the first token's "▁"), not the Encoder's
            expected = expected[1:]
        assert tokenizer.decode(text) == expected, template
        assert ids.count(bos) == (bos is not None) and (bos is None or ids[0] == bos), template
        for tag in TAG_NAME.findall(template):
            assert ids[last[tag] - 1:last[tag] + 1] == encoder.placeholders[tag]


def test_text_target_ends_with_one_eos(tokenizer):
    """A text task (demo stage 3): the target's tokens are the whole text's continuation, then EOS, once."""
    encoder = encoder_for(tokenizer)
    task = TaskConfig(name="t", template="# # Input: <EN> {src}\n# # Output: <FR> <Translate>", target="{tgt}")
    example = encoder.encode(task, 0, RECORD)
    prompt_len = len(encoder.prompt(task.template, RECORD)[0])
    assert example.ids.count(tokenizer.eos_token_id) == 1 and example.ids[-1] == tokenizer.eos_token_id
    target = example.ids[prompt_len:-1]
    assert tokenizer.decode(whole(tokenizer, "a") + target) == "a" + RECORD["tgt"]
    assert example.lm_targets[prompt_len - 1:-1] == target + [tokenizer.eos_token_id]


@pytest.mark.parametrize("name", ["qwen_05b", "qwen_15b"])
def test_qwen_encoder_adds_no_bos_and_ends_targets_with_im_end(request, name):
    """Both Qwen2.5-Coder tokenizers (Qwen2Tokenizer from the GGUF): they name a BOS (<|endoftext|>) but never add
    it, so the Encoder adds none; EOS is the chat end <|im_end|>, which closes a text target once; padding uses
    <|endoftext|>, not EOS."""
    tokenizer = request.getfixturevalue(name)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 151_936
    assert tokenizer.bos_token == "<|endoftext|>" and tokenizer("a").input_ids == whole(tokenizer, "a")
    encoder = encoder_for(tokenizer)
    assert encoder.bos == [] and tokenizer.convert_ids_to_tokens(encoder.eos) == "<|im_end|>"
    task = TaskConfig(name="t", template="# # Input: <EN> {src}\n# # Output: <FR> <Translate>", target="{tgt}")
    example = encoder.encode(task, 0, RECORD)
    assert example.ids[0] == whole(tokenizer, "#")[0]  # the template's own first token, no BOS before it
    assert example.ids[-1] == encoder.eos and example.ids.count(encoder.eos) == 1
    assert tokenizer.bos_token_id not in example.ids and tokenizer.pad_token == "<|endoftext|>"


def test_smollm2_gemma_and_qwen_ids_are_the_pieces_tokenized_alone(smollm2, gemma, qwen_05b, qwen_15b):
    """Byte-level BPE (SmolLM2, Qwen2) and Gemma's SentencePiece add no dummy prefix: every piece is tokenized on
    its own, the encoding before version 2 (the committed runs' ids), computed here piece by piece."""
    for tokenizer in (smollm2, gemma, qwen_05b, qwen_15b):
        encoder = encoder_for(tokenizer)
        for template, _ in recipe_templates():
            expected = list(encoder.bos)
            for piece in TAG_NAME.split(fill(template, RECORD)):
                expected += whole(tokenizer, piece) if piece else []
            ids, is_tag, _ = encoder.prompt(template, RECORD)
            assert text_ids(encoder, ids, is_tag) == expected[len(encoder.bos):] and ids[:len(encoder.bos)] == \
                expected[:len(encoder.bos)], template


def test_dummy_prefix_is_not_added_after_a_tag(sp_folder):
    """What the fix is for: on its own, "\\n# # Output" gains a "▁" (dummy prefix); after a tag it must not."""
    for legacy in (True, False):
        tokenizer = llama(sp_folder, legacy)
        alone = whole(tokenizer, "\n# # Output")
        assert alone[0] == tokenizer.convert_tokens_to_ids("▁")  # the dummy prefix, a token of its own here
        encoder = encoder_for(tokenizer)
        ids, is_tag, _ = encoder.prompt("<SMILES>\n# # Output", RECORD)
        assert text_ids(encoder, ids, is_tag) == alone[1:]


def test_a_tokenizer_that_merges_the_sentinel_is_an_error(tmp_path):
    """A vocabulary with a "\\n\\n" piece merges the newline sentinel into a text that starts with one: the text's
    own tokens cannot be recovered, so the Encoder says so rather than training on wrong ids."""
    tokenizer = llama(train_sentencepiece(tmp_path, user_defined_symbols=["\n\n"]), legacy=False)
    with pytest.raises(UserError, match="merges a newline with the text " + re.escape(repr("\nthe"))):
        encoder_for(tokenizer).prompt("<SMILES>\nthe", RECORD)
    encoder = encoder_for(tokenizer)
    ids, is_tag, _ = encoder.prompt("<SMILES> the", RECORD)  # a text that starts otherwise is fine
    assert text_ids(encoder, ids, is_tag) == whole(tokenizer, " the")
