"""Tokenizer parity: our SentencePiece-only code against HF's slow LlamaTokenizer (legacy=True, the one
the release used) driven by the official LLaVA-Rad logic, restated below from microsoft/LLaVA-Rad
(llava/utils.py loaders, llava/mm_utils.py tokenizer_image_token, llava/conversation.py conv_vicuna_v1,
llava/train/train.py preprocess_multimodal / preprocess_plain / preprocess_v1,
llava/eval/model_mimic_cxr.py prompt building and output post-processing)."""

import random

import pytest
import torch
from _sp_fixtures import train_tiny_sp

from llavarad.model.prompt import SYSTEM, build_prompt, build_question

from llavarad.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Tokenizer

REASONS = [
    None,
    "Shortness of breath.",
    "Fever\ncough, r/o pneumonia",
    "",
    "   ",
    "  leading and trailing  ",
    "a\n\nb\n",
    "Temp 38.5 °C, 67 y/o, s/p CABG 2019",
    "café 中文 naïve",
    "ends with </s> and <s> and <unk>",
    "a stray <image> tag",
    "tabs\tand\r\nwindows",
]
FINDINGS = [
    "Mild cardiomegaly.",
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "Endotracheal tube 4.5 cm above the carina.\nNG tube in the stomach.",
    "  Leading  and  repeated   spaces.  ",
    "Température 37° é 中 ✓",
    "1234567890",
    "\n",
    " ",
    "",
    "Stable.</s>",
    "Part one.</s>Part two.",
    "First.</s>Then USER: more ASSISTANT: answer",
    "Has ASSISTANT: inside.",
    "<unk> unknown",
    "<s>bos text",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tiny_sp(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def ours(model_path):
    return Tokenizer(str(model_path))


@pytest.fixture(scope="module")
def hf(model_path):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(vocab_file=str(model_path), legacy=True)
    tok.pad_token = tok.unk_token  # as the official train.py does for v1 and plain
    return tok


# ---- the official logic, restated over the HF tokenizer (the reference semantics) ----


def official_loader_value(reason):
    """data_loader_mimic_reason_findings: the human turn of a record."""
    if reason is not None:
        reason = reason.replace("\n", " ")
        return (
            "<image>\nProvide a description of the findings in the radiology image given the following "
            f"indication: {reason}"
        )
    return "<image>\nProvide a description of the findings in the radiology image."


def official_preprocess_multimodal(value):
    """train.py preprocess_multimodal (no im_start/end, not mmtag)."""
    if "<image>" in value:
        value = value.replace("<image>", "").strip()
        value = ("<image>" + "\n" + value).strip()
    return value


def official_vicuna_v1_prompt(user, assistant):
    """conv_vicuna_v1.get_prompt() with one USER and one ASSISTANT message (SeparatorStyle.TWO)."""
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    text = system + " "
    for i, (role, message) in enumerate([("USER", user), ("ASSISTANT", assistant)]):
        text += f"{role}: {message}" + [" ", "</s>"][i % 2] if message else f"{role}:"
    return text


def official_inference_prompt(value):
    """model_mimic_cxr.py eval_model: the prompt for one query."""
    q = value.replace("<image>", "").strip()
    return official_vicuna_v1_prompt("<image>\n" + q, None)


def official_tokenizer_image_token(prompt, tok):
    """mm_utils.tokenizer_image_token: chunks tokenized with BOS, BOS kept only at the start."""
    chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    interleaved = []
    for chunk in chunks:
        interleaved += [chunk, [IMAGE_TOKEN_INDEX] * (offset + 1)]
    for part in interleaved[:-1]:
        ids.extend(part[offset:])
    return ids


def official_preprocess_plain(findings, tok):
    ids = torch.tensor(official_tokenizer_image_token("<image>" + findings + "\n", tok))
    labels = ids.clone()
    labels[: len(official_tokenizer_image_token("<image>", tok))] = IGNORE_INDEX
    return ids.tolist(), labels.tolist()


def official_preprocess_v1(user, findings, tok, model_max_length=2048):
    conversation = official_vicuna_v1_prompt(user, findings)
    ids = torch.tensor(official_tokenizer_image_token(conversation, tok))
    target = ids.clone()
    sep = " " + "ASSISTANT" + ": "
    total_len = int(target.ne(tok.pad_token_id).sum())
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(official_tokenizer_image_token(rou, tok))
        instruction_len = len(official_tokenizer_image_token(parts[0], tok)) - 2
        target[cur_len : cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    if cur_len < model_max_length and cur_len != total_len:
        target[:] = IGNORE_INDEX
    return ids.tolist(), target.tolist()


def official_decode(ids, tok):
    outputs = tok.decode(ids, skip_special_tokens=True).strip()
    if outputs.endswith("</s>"):
        outputs = outputs[: -len("</s>")]
    return outputs.strip()


# ---- tests ----


def test_questions_and_prompts_match_official_loader_and_eval():
    for reason in REASONS:
        question = build_question(reason)
        assert build_prompt(question) == official_inference_prompt(official_loader_value(reason)), reason
        # Training sees the same question, after preprocess_multimodal.
        assert official_preprocess_multimodal(official_loader_value(reason)) == "<image>\n" + question
    assert build_question(None) == "Provide a description of the findings in the radiology image."
    assert build_question("Cough.\nFever.") == (
        "Provide a description of the findings in the radiology image given the following indication: "
        "Cough. Fever."
    )
    assert build_prompt("Q?") == SYSTEM + " USER: <image>\nQ? ASSISTANT:"


def test_special_ids(ours, hf):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert ours.vocab_size == hf.vocab_size == 400


def test_encode_text_matches_hf(ours, hf):
    texts = REASONS[1:] + FINDINGS + [
        "a</s>b", "a </s> b", "</s></s>", "<s>", "x<unk>y", "<</s>>", "</ s>", "<S>", "\n", "\nNew line",
        " leading", "trailing ", "double  space", "   ", "2024-01-31 10:45", "é°中", "▁literal",
    ]
    for text in texts:
        assert ours.encode_text(text) == hf.encode(text, add_special_tokens=False), repr(text)
    # Legacy mode: the text after a special token gets the dummy-prefix space again.
    assert [ours.sp.id_to_piece(i) for i in ours.encode_text("a</s>b")] == ["▁a", "</s>", "▁b"]


def test_encode_prompt_matches_official_tokenizer_image_token(ours, hf):
    prompts = [build_prompt(build_question(r)) for r in REASONS]
    prompts += ["<image>", "", "x<image>", "<image>x</s>", " <image> ", "<s><image></s>y"]
    for prompt in prompts:
        assert ours.encode_prompt(prompt) == official_tokenizer_image_token(prompt, hf), repr(prompt)
    # The chunk after the image gets the dummy-prefix space, then the newline byte.
    ids = ours.encode_prompt(build_prompt(build_question(None)))
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[0] == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert [ours.sp.id_to_piece(i) for i in ids[at + 1 : at + 3]] == ["▁", "<0x0A>"]


def test_only_the_templates_image_is_the_image_token(ours):
    """A second "<image>" (the official code would hand a second -200 to the embedding and crash) is
    text: here a reason that build_question's one-pass removal turns into "<image>"."""
    question = build_question("<<image>image> seen")
    assert question.endswith("indication: <image> seen")
    ids = ours.encode_prompt(build_prompt(question))
    assert ids == [1] + ours.sp.encode(SYSTEM + " USER: ") + [IMAGE_TOKEN_INDEX] + ours.sp.encode("\n" + question + " ASSISTANT:")
    assert ours.encode_prompt("<image><image>") == [1, IMAGE_TOKEN_INDEX] + ours.sp.encode("<image>")
    for findings in ("<image>", "a</s>b <image> ASSISTANT: c"):  # also in a later round of the v1 count
        ids, labels = ours.encode_v1(question, findings)
        assert ids.count(IMAGE_TOKEN_INDEX) == 1 and IMAGE_TOKEN_INDEX not in labels


def test_v1_mismatch_check_is_skipped_from_model_max_length_on_as_official(ours, hf):
    """The official preprocess_v1 masks a sample whose round counts miss its length only while the
    count is under model_max_length; encode_v1's max_len is that limit."""
    question = build_question("Cough.")
    user = official_preprocess_multimodal(official_loader_value("Cough."))
    for findings in ("<unk> unknown", "Mild cardiomegaly."):
        n = len(ours.encode_v1(question, findings)[0])
        for max_len in (10, n - 1, n, n + 1, 2048):
            ours_ids = ours.encode_v1(question, findings, max_len)
            assert ours_ids == official_preprocess_v1(user, findings, hf, model_max_length=max_len), (findings, max_len)
    masked = ours.encode_v1(question, "<unk> unknown", 2048)[1]
    kept = ours.encode_v1(question, "<unk> unknown", 10)[1]
    assert set(masked) == {IGNORE_INDEX} and set(kept) != {IGNORE_INDEX}


def test_decode_matches_official_postprocessing(ours, hf):
    rng = random.Random(0)
    byte_ids = [ours.sp.piece_to_id(f"<0x{b:02X}>") for b in (0x0A, 0x20, 0xC3, 0xA9, 0xE4, 0xB8, 0xAD, 0x09)]
    sequences = [[], [2], [1, 2, 0], [ours.sp.piece_to_id("▁")] * 3]
    for _ in range(300):
        n = rng.randint(1, 40)
        sequences.append([rng.choice(byte_ids + [0, 1, 2]) if rng.random() < 0.3 else rng.randrange(400)
                          for _ in range(n)])
    for text in FINDINGS + ["Mild cardiomegaly. </s>", "No effusion.</s>  ", "</s>"]:
        # The model writing the literal text "</s>" as pieces, then the EOS token.
        sequences.append(ours.sp.encode(text) + [2])
    for ids in sequences:
        assert ours.decode(ids) == official_decode(ids, hf), ids
    assert ours.decode(ours.sp.encode("No effusion.</s>") + [2]) == "No effusion."
    for text in FINDINGS[:6]:
        assert ours.decode(ours.encode_text(text) + [2]) == text.strip()


def test_plain_labels_match_official(ours, hf):
    for findings in FINDINGS:
        ids, labels = ours.encode_plain(findings)
        assert (ids, labels) == official_preprocess_plain(findings, hf), repr(findings)
        assert ids[:2] == [1, IMAGE_TOKEN_INDEX] and labels[:2] == [IGNORE_INDEX] * 2


def test_v1_labels_match_official(ours, hf):
    for reason in REASONS:
        question = build_question(reason)
        user = official_preprocess_multimodal(official_loader_value(reason))
        for findings in FINDINGS:
            ids, labels = ours.encode_v1(question, findings)
            assert (ids, labels) == official_preprocess_v1(user, findings, hf), (reason, findings)


def test_v1_supervises_only_answer_and_eos(ours):
    """On ordinary text the official masks reduce to: everything after the inference prompt."""
    ordinary = [f for f in FINDINGS if f and "</s>" not in f and "ASSISTANT" not in f and "<unk>" not in f]
    for reason in [r for r in REASONS if r is None or "</s>" not in r]:
        question = build_question(reason)
        n = len(ours.encode_prompt(build_prompt(question)))
        for findings in ordinary:
            ids, labels = ours.encode_v1(question, findings)
            assert ids[-1] == 2 and len(ids) > n
            assert labels == [IGNORE_INDEX] * n + ids[n:], (reason, findings)


def test_reference_example_masks(ours):
    """docs/prompt.md: "... ASSISTANT: Mild cardiomegaly.</s>" supervises its pieces and EOS only."""
    answer = ours.sp.encode("Mild cardiomegaly.", out_type=str)
    assert "".join(answer) == "▁Mild▁cardiomegaly."
    ids, labels = ours.encode_v1(build_question("Cough."), "Mild cardiomegaly.")
    n = len(answer) + 1
    assert labels[:-n] == [IGNORE_INDEX] * (len(ids) - n)
    assert labels[-n:] == ids[-n:]
    assert [ours.sp.id_to_piece(i) for i in labels[-n:]] == answer + ["</s>"]
    ids, labels = ours.encode_plain("Mild cardiomegaly.")
    assert ids[:2] == [1, IMAGE_TOKEN_INDEX]
    assert labels == [IGNORE_INDEX] * 2 + ids[2:]
    assert [ours.sp.id_to_piece(i) for i in ids[2:]] == answer + ["<0x0A>"]


def test_inference_prompt_is_prefix_of_training_ids(ours):
    for reason in REASONS:
        question = build_question(reason)
        prompt_ids = ours.encode_prompt(build_prompt(question))
        for findings in FINDINGS:
            ids, _ = ours.encode_v1(question, findings)
            assert ids[: len(prompt_ids)] == prompt_ids, (reason, findings)


def test_bad_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(str(tmp_path / "missing.model"))
    for name, data in [("garbage.model", b"not a model"), ("empty.model", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            Tokenizer(str(tmp_path / name))
