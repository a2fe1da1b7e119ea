"""What the omni routes do once a body is read: build the canonical request, run it, shape the answer.

Split as vLLM splits an endpoint (openai/chat_completion/{api_router,protocol,serving}.py):
the bodies are `request/protocol.py`'s models, the routes (`server/routes/`) read the
HTTP request and hand its fields here, and these modules run them:

    images.py   the images answer (generations, edits, and the image answer of chat)
    chat.py     a chat body -> prompt and input images -> the images answer as a chat completion
    videos.py   video jobs: validated and queued, finished in the background, cancelled on DELETE
"""
