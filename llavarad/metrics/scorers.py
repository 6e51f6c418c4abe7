"""The official scorer weights, downloaded on request: `evaluate.py --chexbert auto --radgraph auto`.

The files are those LLaVA-Rad's evaluation downloads: `chexbert.pth` from StanfordAIMI/RRG_scorers
(as the f1chexbert package, from main) with bert-base-uncased's vocab.txt; `radgraph.tar.gz` from
the same repo at the revision the radgraph package pins, with the vocab.txt of the BERT named in the
archive's config.json. huggingface_hub keeps them in its cache.
"""

from dataclasses import dataclass

from llavarad.hub import download_command, file_url, hub_download, hub_installed

AUTO = "auto"
RRG_SCORERS = "StanfordAIMI/RRG_scorers"
RADGRAPH_REVISION = "d97745aa136e5beb927da7e768e99de6ae807902"
RADGRAPH_BERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"  # PubMedBERT's current name


@dataclass
class HubFile:
    flag: str  # the evaluate.py option it answers
    repo: str
    filename: str
    revision: str | None = None


CHEXBERT = HubFile("--chexbert", RRG_SCORERS, "chexbert.pth")
BERT_VOCAB = HubFile("--bert-vocab", "google-bert/bert-base-uncased", "vocab.txt")
RADGRAPH = HubFile("--radgraph", RRG_SCORERS, "radgraph.tar.gz", RADGRAPH_REVISION)


def resolve_auto(chexbert: str | None, bert_vocab: str | None, radgraph: str | None,
                 radgraph_vocab: str | None) -> tuple[str | None, str | None, str | None, str | None]:
    """The four evaluate.py paths with each "auto" replaced by the downloaded file's path; a vocab
    left out beside an "auto" model is "auto" too. Without huggingface_hub: one ValueError naming
    every file wanted and its address."""
    if chexbert == AUTO and bert_vocab is None:
        bert_vocab = AUTO
    if radgraph == AUTO and radgraph_vocab is None:
        radgraph_vocab = AUTO
    if AUTO not in (chexbert, bert_vocab, radgraph, radgraph_vocab):
        return chexbert, bert_vocab, radgraph, radgraph_vocab
    if radgraph_vocab == AUTO and radgraph is None:
        raise ValueError("--radgraph-vocab auto needs --radgraph: the archive's config.json names the BERT whose vocab.txt it is")
    if not hub_installed():  # say so before any download
        wanted = [f for f, value in ((CHEXBERT, chexbert), (BERT_VOCAB, bert_vocab), (RADGRAPH, radgraph),
                                     (HubFile("--radgraph-vocab", RADGRAPH_BERT, "vocab.txt"), radgraph_vocab)) if value == AUTO]
        raise ValueError(
            f"{', '.join(f.flag for f in wanted)} auto need huggingface_hub (pip install 'llavarad[hub]'); or download "
            + ", ".join(f"{f.filename} ({file_url(f.repo, f.filename, f.revision)})" for f in wanted)
            + " and pass their paths instead of auto"
        )
    chexbert = fetch(CHEXBERT) if chexbert == AUTO else chexbert
    bert_vocab = fetch(BERT_VOCAB) if bert_vocab == AUTO else bert_vocab
    radgraph = fetch(RADGRAPH) if radgraph == AUTO else radgraph
    if radgraph_vocab == AUTO:
        from llavarad.metrics.radgraph import bert_name  # only now: the archive is there

        radgraph_vocab = fetch(HubFile("--radgraph-vocab", bert_name(radgraph), "vocab.txt"))
    return chexbert, bert_vocab, radgraph, radgraph_vocab


def fetch(f: HubFile) -> str:
    try:
        return str(hub_download(f.repo, f.filename, f.revision))
    except ConnectionError as e:
        raise ValueError(f"{f.flag} auto: downloading {f.filename} from {f.repo} failed ({e}); where there is a network, "
                         f"get it ({download_command(f.repo, f.filename, f.revision)}, or {file_url(f.repo, f.filename, f.revision)}) "
                         f"and pass its path") from None
