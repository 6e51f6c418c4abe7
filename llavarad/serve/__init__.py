"""The OpenAI-compatible server (serve.py): one process owns the model and runs every request through
the continuous-batching decoder of generate.py.

    chat.py       an OpenAI chat-completions body -> a validated ChatRequest (or an APIError)
    api_error.py  APIError: OpenAI's error body, its status and outcome
    explanation.py  a /v1/explain body -> an ExplainRequest; an Explanation -> overlays as data: URLs
    scheduler.py  Job (its own queue of tokens) and the engine: the bounded queue, the one decode loop
                  (a thread: admit, prefill, decode, deliver) and the refusals (429, 503)
    stream.py     token ids -> text pieces that never split a character
    completion.py one request from submit to outcome: SSE chunks or one JSON body, cancel on disconnect
    prometheus.py the Prometheus counters, gauges and histograms
    middleware.py what wraps every request: the Host check, the API key, the last-resort 500 and the count
    app.py        the FastAPI routes: body limit, request preparation, explanations, the page
    static/       the reading-room page (no external scripts, fonts or styles)
"""
