"""What the tiny LMs read: world episodes whose questions make the referent of a pronoun matter."""

from storygpt.world.cast import SETTINGS
from storygpt.world.corpus import QUESTION, RUN_FRAMES, answer, lm_corpus, tell
from storygpt.world.stories import FramePlan


def test_the_answer_after_a_pronoun_caption_is_its_referent():
    forest = SETTINGS[1]
    run = [FramePlan(forest, ["Bruno", "Emma"], "Bruno and Emma wave hello."),
           FramePlan(forest, ["Bruno", "Emma"], "Bruno and Emma sit down."),
           FramePlan(forest, ["Emma"], "Emma is laughing."),
           FramePlan(forest, ["Emma"], "Emma runs around.")]
    assert tell(run, [False, True, False, True]) == [
        "Bruno and Emma wave hello.", "They sit down.", QUESTION, "Bruno and Emma.",
        "Emma is laughing.", "She runs around.", QUESTION, "Emma."]
    assert tell(run, [False] * 4, rule=None) == [p.caption for p in run]  # a named run keeps every name


def test_corpus_is_deterministic_with_questions_and_long_runs():
    texts = lm_corpus(seed=0, episodes=20)
    assert texts == lm_corpus(seed=0, episodes=20) and texts != lm_corpus(seed=1, episodes=20)
    questions = [text.count(QUESTION) for text in texts]
    captions = [len(text) - 2 * q for text, q in zip(texts, questions)]
    assert RUN_FRAMES[0] <= max(captions) <= RUN_FRAMES[1] and max(captions) >= RUN_FRAMES[1] - 3
    assert 0.35 < sum(questions) / sum(captions) < 0.65  # about half the frames are asked about


def test_answers_name_the_cast_in_the_worlds_order():
    assert answer(["Emma", "Ada"]) == "Ada and Emma."
    assert answer(["Gus", "Ada", "Cleo"]) == "Ada, Cleo and Gus."
    assert answer([]) == "Nobody."
