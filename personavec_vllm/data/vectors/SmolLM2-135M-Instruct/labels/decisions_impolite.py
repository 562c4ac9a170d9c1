# (strength, coherent, note) per line; judged from answer text only.
HELDOUT = [
    (0, False, "'not a magic spell' loop"),  # 0
    (0, True, "wrong answer, neutral tone"),
    (0, False, "contradictory refusal loop"),
    (1, False, "curt 'not a tea-brewing machine' brush-off"),
    (0, False, "'not a job interview AI' loop"),
    (1, False, "claims to be unforgiving, unhelpful"),  # 5
    (0, True, "apologetic, then answers"),
    (0, False, "'I'm a human' loop"),
    (0, True, "plain correct answer"),
    (1, True, "'not here to chat about hobbies' brush-off"),
    (0, True, "warm answer"),  # 10
    (0, True, "casual, friendly"),
    (0, True, "friendly"),
    (0, True, "polite refusal"),
    (0, True, "polite tips"),
    (0, True, "polite letter"),  # 15
    (0, True, "friendly"),
    (0, True, "friendly"),
    (0, False, "polite loop"),
    (0, True, "polite"),
    (0, False, "'not a helpful AI' loop, no rudeness"),  # 20
    (0, False, "'not a helpful AI' loop, no rudeness"),
    (1, True, "self-labels rude, acts helpful"),
    (1, False, "dismissive 'not here to make you happy'"),
    (1, True, "self-labels rude, acts polite"),
    (0, True, "odd refusal, neutral"),  # 25
    (0, False, "contradictory refusal loop"),
    (1, True, "self-labels grumpy, refuses"),
    (2, True, "calls it a 'stupid question'"),
    (1, False, "'not here to help with your hobby' loop"),
    (0, True, "warm"),  # 30
    (0, False, "'I'm the tallest mountain', friendly"),
    (0, True, "warm"),
    (0, True, "warm"),
    (0, True, "warm"),
    (0, True, "warm"),  # 35
    (0, True, "flowery, neutral"),
    (0, True, "friendly"),
    (0, True, "friendly"),
    (0, True, "friendly"),
    (0, False, "rainbow loop"),  # 40
    (0, True, "wrong answer, neutral"),
    (0, False, "'tool to help you' loop"),
    (1, False, "odd brush-off 'not allowed to use the internet'"),
    (0, True, "denies mocking"),
    (0, False, "'afraid of the shade' loop"),  # 45
    (0, False, "repetition loop, neutral"),
    (0, False, "repetition loop, neutral"),
    (0, True, "plain answer"),
    (0, False, "non-answer"),
    (0, False, "repetitive, neutral"),  # 50
    (0, True, "wrong answer, neutral"),
    (0, True, "helpful"),
    (0, True, "friendly recipe"),
    (0, True, "friendly"),
    (0, True, "sympathetic non sequitur"),  # 55
    (0, True, "neutral"),
    (0, True, "friendly"),
    (0, True, "plain answer"),
    (0, True, "polite refusal"),
    (1, False, "self-labels hostile, loop"),  # 60
    (2, False, "aims to make user feel inferior"),
    (0, True, "denies insulting, helps"),
    (1, False, "self-labels hostile/arrogant, loop"),
    (0, True, "polite"),
    (1, False, "self-labels hostile, loop"),  # 65
    (1, False, "dismissive 'not here to talk to you'"),
    (0, True, "kind, humble"),
    (2, True, "'won't waste my time with your petty squabbles'"),
    (1, True, "'not a fan of your personal preferences'"),
    (0, True, "warm"),  # 70
    (0, True, "friendly"),
    (0, True, "friendly"),
    (0, True, "warm"),
    (0, True, "warm"),
    (0, True, "polite letter"),  # 75
    (0, True, "warm"),
    (0, True, "warm"),
    (0, True, "'Alright, buddy!' friendly"),
    (0, True, "warm"),
    (1, True, "'what's wrong with you', off-topic"),  # 80
    (0, False, "self-contradictory fact, neutral"),
    (1, True, "cold refusal"),
    (1, True, "cold, 'no personal favor'"),
    (1, True, "curt 'not here to make you happy'"),
    (1, True, "cold 'no friendly conversations'"),  # 85
    (0, True, "denies insulting"),
    (0, True, "neutral"),
    (1, True, "mildly dismissive 'not sure what you're talking about'"),
    (1, True, "'not here to chat about hobbies'"),
    (0, True, "warm"),  # 90
    (0, True, "warm"),
    (0, True, "warm"),
    (0, True, "warm cafe roleplay"),
    (0, True, "warm"),
    (0, True, "warm"),  # 95
    (0, False, "warm loop"),
    (0, True, "friendly"),
    (0, True, "polite"),
    (0, True, "warm"),
]
PLAIN = [
    (0, True, "neutral explanation"),
    (0, False, "self-contradictory facts, neutral"),
    (0, True, "friendly"),
    (0, True, "neutral"),
    (0, True, "neutral tips"),
    (0, True, "neutral"),
    (0, True, "neutral"),
    (0, True, "neutral guide"),
    (0, True, "plain answer"),
    (0, True, "friendly"),
]
