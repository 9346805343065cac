"""The HTTP routes, one router per concern, each included by the app factory (service/app.py):

health.py     GET  /healthz  /readyz  /metrics                 (always open)
model_info.py GET  /v1/model  /v1/centers                      (API key when configured)
inference.py  POST /v1/embed  /v1/classify  /v1/distances      (API key when configured)
enrolment.py  PUT  DELETE /v1/centers/{name}                   (admin key; off without one)
v2.py         /v2/...  the Open Inference Protocol (KServe/Triton) (API key on infer)

Routes take what they need as typed dependencies (service/deps.py), never from app.state.
"""
