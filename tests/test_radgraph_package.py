"""F1-RadGraph against the library that defines it: the `radgraph` package (0.1.18, which vendors
AllenNLP + DyGIE++) runs its own model on our tiny random archive, offline, and must give our
annotations and rewards.

LLaVA-Rad pins radgraph 0.0.9. Its model path (DyGIE++ reader, mismatched BERT embedder, NER and
relation modules) and its reward functions are the same code as 0.1.18's, bar decorators and
imports, so 0.1.18 stands for it. The differences, none of which changes a score:
- 0.0.9 reads the model through an AllenNLP archive with dataset None, so its label namespaces are
  "None__*"; 0.1.18 builds the model from the unpacked folder with dataset "radgraph". Our loader
  takes the one "*ner_labels" / "*relation_labels" namespace whatever its prefix.
- 0.1.18's F1RadGraph defaults to model_type "radgraph-xl" (another model, another word split);
  0.0.9 only has "radgraph", which is what we reproduce, so the package runs with model_type="radgraph".
- Neither version lowercases in the "partial" reward (only "complete" does, in both): tokens keep
  their case, as ours do.
- 0.1.18 loads weights.th with strict=True into a DyGIE built by today's transformers, which keeps
  BERT's position_ids buffer out of the state dict and wants every coreference tensor. So the
  archive the package reads drops position_ids (a constant arange) and carries the whole unused
  coreference module, as the real archive does; ours reads that same folder.
"""

import math
import socket

import pytest
import torch

from _metrics_fixtures import PHRASES, REPORTS, write_vocab
from _radgraph_fixtures import FEATURE_SIZE, FF_HIDDEN, archive_files, tiny_config, tiny_state_dict, write_archive
from llavarad.metrics.radgraph import load_radgraph, partial_reward, radgraph_rewards
from llavarad.metrics.radgraph_text import split_words, word_pieces

BERT = "_embedder.token_embedder_bert._matched_embedder.transformer_model."

# Over 510 wordpieces, so two windows even at max_length 512, in few words (the package's
# post-processing takes time in entities x relations, and the tiny model finds many).
LONG = " ".join(PHRASES) + " Apical unaffable effusions 2015, 1105 10x." * 20
# Reports with words: the fixtures' varied texts (punctuation, numbers, unicode, special tokens,
# words with no wordpieces, long words) and more.
TEXTS = [t for t in REPORTS if t.split()] + [
    "Normal",  # one word
    "Effusion.",
    "and/or 50%/. 2.5cm/3.0cm: stable (unchanged)!? x-ray 1-2 -3.5 .5 5.",
    "No pneumothorax. No pneumothorax.",  # a repeated phrase, and a text repeated below
    "No pneumothorax. No pneumothorax.",
    LONG,
]


def coref_tensors(hidden: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The coreference tensors DyGIE++ builds (and RadGraph never runs) that the fixture leaves out."""
    span = 2 * hidden + FEATURE_SIZE
    shapes = {
        "_antecedent_feedforward._module._linear_layers.0.weight": (FF_HIDDEN, 3 * span + FEATURE_SIZE),
        "_antecedent_feedforward._module._linear_layers.0.bias": (FF_HIDDEN,),
        "_antecedent_feedforward._module._linear_layers.1.weight": (FF_HIDDEN, FF_HIDDEN),
        "_antecedent_feedforward._module._linear_layers.1.bias": (FF_HIDDEN,),
        "_mention_pruner._scorer.1._module.weight": (1, FF_HIDDEN),
        "_mention_pruner._scorer.1._module.bias": (1,),
        "_antecedent_scorer._module.weight": (1, FF_HIDDEN),
        "_antecedent_scorer._module.bias": (1,),
        "_f_network._linear_layers.0.weight": (span, 2 * span),
        "_f_network._linear_layers.0.bias": (span,),
    }
    return {f"_coref.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.fixture(scope="module", params=[16, 512], ids=["window16", "window512"])
def both(request, tmp_path_factory):
    """(the package's F1RadGraph, our RadGraph, archive folder, vocab.txt, the package's and our
    annotations of TEXTS) on one tiny random model, with BERT windows of 16 wordpieces (every
    report folded) or the real 512."""
    from transformers import BertConfig, BertTokenizer

    max_length = request.param
    tmp = tmp_path_factory.mktemp(f"radgraph_package_{max_length}")
    vocab = tmp / "vocab.txt"
    sd, bert = tiny_state_dict(len(write_vocab(vocab)))
    sd = {k: v for k, v in sd.items() if k != BERT + "embeddings.position_ids"}
    g = torch.Generator().manual_seed(7)
    sd |= coref_tensors(bert.config.hidden_size, g)
    config = BertConfig.from_dict(bert.config.to_dict())
    if max_length > config.max_position_embeddings:  # more position rows, the first ones kept
        positions = sd[BERT + "embeddings.position_embeddings.weight"]
        more = positions.std() * torch.randn(max_length - len(positions), positions.shape[1], generator=g)
        sd[BERT + "embeddings.position_embeddings.weight"] = torch.cat([positions, more])
        config.max_position_embeddings = max_length

    # The BERT named in config.json: a local folder as transformers saves it (config, vocab and
    # tokenizer_config), "uncased" in its name as the real one.
    bert_dir = tmp / "tiny-bert-uncased"
    config.save_pretrained(bert_dir)
    BertTokenizer(str(vocab)).save_pretrained(bert_dir)
    cfg = tiny_config(max_length)
    for b in (cfg["dataset_reader"]["token_indexers"]["bert"], cfg["model"]["embedder"]["token_embedders"]["bert"]):
        b["model_name"] = str(bert_dir)
    cfg["model"] |= {"initializer": {}, "module_initializer": {}}  # the package deletes these keys
    # The package reads <model_cache_dir>/<model_type>/ and downloads only when it is missing.
    archive = tmp / "models" / "radgraph"
    archive.mkdir(parents=True)
    write_archive(archive, archive_files(sd, cfg))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")

        def no_network(*args, **kwargs):
            raise AssertionError("the radgraph package tried to use the network")

        mp.setattr(socket.socket, "connect", no_network)
        from radgraph import F1RadGraph

        package = F1RadGraph(
            reward_level="partial", model_type="radgraph", model_cache_dir=str(tmp / "models"),
            tokenizer_cache_dir=str(tmp / "hf_cache"), cuda=-1,
        )
        ours = load_radgraph(str(archive), str(vocab))
        expected = package.radgraph(TEXTS)  # {"0": {"text", "entities", "data_source", "data_split"}}
        got = ours.annotate(TEXTS, batch_size=3)  # mixed lengths in a batch: padding must not matter
        # The package runs again in the tests below, so the network stays blocked for those too.
        yield package, ours, str(archive), str(vocab), [expected[str(i)] for i in range(len(TEXTS))], got


def test_long_report_is_over_one_512_window(both):
    _, ours, *_ = both
    assert len(word_pieces(split_words(LONG), ours.tokenizer).ids) > 512 - 2


def test_annotations_equal_the_package(both):
    *_, expected, got = both
    n_entities = n_relations = 0
    for i, text in enumerate(TEXTS):
        want = {k: expected[i][k] for k in ("text", "entities")}
        assert got[i] == want, text
        n_entities += len(want["entities"])
        n_relations += sum(len(e["relations"]) for e in want["entities"].values())
    assert n_entities > 3 * len(TEXTS) and n_relations > 10  # the comparison is not vacuous


def test_partial_rewards_equal_the_package(both):
    from radgraph.rewards import compute_reward

    package, _, archive, vocab, expected, got = both
    rewards = []
    for i in range(len(TEXTS)):
        for j in range(len(TEXTS)):
            reward = compute_reward(expected[i], expected[j], "partial")
            assert partial_reward(got[i], got[j]) == reward, (TEXTS[i], TEXTS[j])
            rewards.append(reward)
    assert len(set(rewards)) > 10

    # End to end, empty texts included: the package's F1RadGraph scores a pair with an empty
    # text 0 without running the model, as we do.
    short = TEXTS[:-1]
    hyps = short[:8] + ["", short[3], "No pneumothorax.", "Heart size is normal."]
    refs = short[::-1][:8] + [short[2], "", "No pneumothorax. Stable cardiomegaly.", "HEART SIZE IS NORMAL."]
    mean, want, *_ = package(refs=refs, hyps=hyps)
    assert radgraph_rewards(hyps, refs, archive, vocab, "cpu", 4, None) == want
    assert math.isclose(mean, sum(want) / len(want)) and 0 < mean < 1
    # The uncased BERT finds the same entities in both cases; their tokens differ in case.
    upper, lower = package.radgraph([hyps[-1], refs[-1]]).values()
    assert len(upper["entities"]) == len(lower["entities"]) > 0 and want[-1] == 0.0


def test_blank_text_scores_zero_where_the_package_fails(both):
    """A text of only whitespace has no words: DyGIE++'s reader cannot build its (empty) span list
    and the package raises, so LLaVA-Rad's evaluation would stop. We score such a pair 0."""
    package, _, archive, vocab, *_ = both
    with pytest.raises(AssertionError, match="ListFields must contain a single field type"):
        package(refs=["No pneumothorax."], hyps=["   "])
    assert radgraph_rewards(["   "], ["No pneumothorax."], archive, vocab) == [0.0]
