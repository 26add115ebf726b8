"""The message-broker handlers of SPEC §8: ``nats``, ``rabbitmq``, ``redis`` and ``sqs``.

One module per broker; each imports its client library (an optional extra,
``pip install 'lacuna-webhooks[nats]'``...) and is itself imported only when
``LACUNA_HANDLERS`` names it. What they share (templates, URL checks, the
missing-extra message, scrubbing secrets from error text) is in ``_shared``.
"""
