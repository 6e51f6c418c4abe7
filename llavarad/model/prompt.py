"""The prompt's text: the Vicuna v1 conversation LLaVA-Rad was trained and evaluated with, and the
question for a reason for exam (docs/prompt.md). Text only; tokenizer.py turns it into ids."""

IMAGE_TOKEN = "<image>"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QUESTION = "Provide a description of the findings in the radiology image."
QUESTION_WITH_REASON = (
    "Provide a description of the findings in the radiology image given the following indication: {reason}"
)
ANSWER_SEP = " ASSISTANT: "  # Vicuna v1: sep " " + role + ": "
EOS_TEXT = "</s>"  # Vicuna v1 ends every answer with this literal text (sep2)


def human_turn(reason: str | None) -> str:
    """The MIMIC loaders' human turn for a reason for exam (None = no reason): "<image>\n" + the
    question, unstripped, as the official prediction files record it in `query`.

    As in the official loader, only None selects the no-reason question: an empty reason gives
    "...indication: ".
    """
    if reason is None:
        return IMAGE_TOKEN + "\n" + QUESTION
    return IMAGE_TOKEN + "\n" + QUESTION_WITH_REASON.format(reason=reason.replace("\n", " "))


def build_question(reason: str | None) -> str:
    """The question the prompt holds: both the training and evaluation paths delete "<image>" from
    the human turn and strip it."""
    return human_turn(reason).replace(IMAGE_TOKEN, "").strip()


def build_prompt(question: str) -> str:
    """The Vicuna v1 inference prompt; the answer follows "ASSISTANT:"."""
    return SYSTEM + " USER: " + IMAGE_TOKEN + "\n" + question + " ASSISTANT:"
