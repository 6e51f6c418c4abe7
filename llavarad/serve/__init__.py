"""The OpenAI-compatible server (serve.py): one process owns the model and runs every request through
the continuous-batching decoder of generate.py.

    chat.py       an OpenAI chat-completions body -> a validated ChatRequest (or an APIError)
    errors.py     APIError and OpenAI's error body
    explanation.py  a /v1/explain body -> an ExplainRequest; an Explanation -> overlays as data: URLs
    scheduler.py  the bounded queue and the one decode loop (a thread): admit, prefill, decode, deliver
    stream.py     token ids -> text pieces that never split a character
    completion.py one request's answer: SSE chunks or one JSON body; a client that leaves frees its row
    metrics.py    the Prometheus counters, gauges and histograms
    app.py        the FastAPI routes: auth, body limit, SSE streaming, explanations, the page
    static/       the reading-room page (no external scripts, fonts or styles)
"""
