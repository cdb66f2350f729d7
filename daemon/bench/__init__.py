"""``tickcast bench``: the end-to-end benchmark, in one run, on a real Kafka broker.

Phases (each daemon runs as a child process, ``python -m daemon.bench``, so its CPU time
and RSS are its own; the broker, the tick producer and the prediction consumer share the
same machine, as they would on a small box):

* (a) model ceiling: ``Predictor.predict`` (scale + forward + unscale) on batches alone,
  swept over batch sizes, for nn.GRU and the explicit GRU-cell forward (TorchScript, and
  ``torch.compile``-d), on 1 and 2 threads; plus the FLOP fraction of a measured sgemm peak.
  The sweep picks the best point; (a) is the median of longer re-measurements of that point
  (after the sweep and before each (c) drain), not the sweep's fastest short sample.
* (b) naive baseline: the seed's way, one forward pass per tick: the daemon itself with
  ``max_batch_size=1`` and ``nn.GRU``, draining a backlog through Kafka.
* (c) tickcast: the daemon with its defaults (dynamic batching, fast forward) draining
  the same kind of backlog; every tick with a full window must come back predicted.
* latency: the (c) daemon under live, rate-limited load (fractions of (c)); ticks carry
  the wall clock as ``ts``, and latency = time a consumer of the output topic receives
  the prediction - ts.
* conflation: ingest rate with ``conflate=True`` on a few hot symbols.
* memory: 1,000,000 symbols in a child that builds the service and fills its windows
  directly (not through Kafka); the RSS is the child's real RSS.
* soak (``--soak SECONDS``): the (c) daemon's RSS sampled under half load.

Modules, in the order a run uses them: ``run`` (the command: arguments, embedded broker,
report), ``plan`` (what a run does; the state its phases share), ``ceiling`` (a),
``phases`` (everything through Kafka, in order), ``load`` (the tick producer and the
prediction reader), ``child`` (the daemon under test as a child process; the memory
probe), ``sampling`` (CPU and RSS while a phase runs), ``restore`` (the restore figure),
``report`` (targets, verdicts, table, plots).

Prices are real (``dataset:nasdaq``, ``sp500``, ``goog``, ``eurusd``, ``btcusd``),
replicated over S symbols: ``NASDAQ.17`` is NASDAQ's series started at another offset
(and cycled when it runs out).
"""
