"""RQ's side of the work-queue benchmark (host/benches/work-queue.rs).

    python rq_bench.py --url redis://127.0.0.1:PORT --queue NAME --tasks 20000
        --workers 4 --worker-class rq.worker.SimpleWorker --mode first|concurrent

Submits --tasks no-op jobs to a fresh queue and runs them on --workers
standard `rq worker` processes, then prints one JSON line: tasks per
second from the first submit to the last job's end, each job's
queue-to-start latency (its enqueued_at to its started_at, as RQ records
them), and the CPU time of this driver and of the workers (with the children
they fork per job).

Mode `first` submits every job, then starts the workers with --burst:
they quit once the queue is empty. Mode `concurrent` starts the workers
first and submits while they work; the workers are stopped (warm
shutdown) once every job has finished.

Jobs are submitted as RQ's bulk API does it: enqueue_many, 500 jobs to a
Redis pipeline.
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from datetime import timezone

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry

CHUNK = 500


def noop():
    """The task: nothing."""
    return None


def start_workers(args, burst):
    here = os.path.dirname(os.path.abspath(__file__))
    rq = os.path.join(os.path.dirname(sys.executable), "rq")
    command = [rq, "worker", "--url", args.url, "--path", here, "--worker-class", args.worker_class]
    command += ["--logging_level", "WARNING"]
    if burst:
        command.append("--burst")
    command.append(args.queue)
    return [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(args.workers)
    ]


def submit(queue, tasks):
    ids = []
    for start in range(0, tasks, CHUNK):
        datas = [Queue.prepare_data("rq_bench.noop") for _ in range(start, min(tasks, start + CHUNK))]
        with queue.connection.pipeline() as pipe:
            jobs = queue.enqueue_many(datas, pipeline=pipe)
            pipe.execute()
        ids.extend(job.id for job in jobs)
    return ids


def seconds(when):
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--worker-class", default="rq.worker.Worker")
    parser.add_argument("--mode", choices=["first", "concurrent"], default="first")
    args = parser.parse_args()

    redis = Redis.from_url(args.url)
    queue = Queue(args.queue, connection=redis)
    started = time.time()
    if args.mode == "first":
        ids = submit(queue, args.tasks)
        submitted = time.time()
        for worker in start_workers(args, burst=True):
            worker.wait()
    else:
        workers = start_workers(args, burst=False)
        ids = submit(queue, args.tasks)
        submitted = time.time()
        finished = FinishedJobRegistry(queue=queue)
        failed = FailedJobRegistry(queue=queue)
        deadline = time.time() + 600
        while finished.count + failed.count < args.tasks and time.time() < deadline:
            time.sleep(0.02)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait()

    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    latencies, ends, done, failed = [], [], 0, 0
    for start in range(0, len(ids), CHUNK):
        for job in Job.fetch_many(ids[start : start + CHUNK], connection=redis):
            if job is None or job.ended_at is None:
                failed += 1
                continue
            done += 1
            latencies.append((seconds(job.started_at) - seconds(job.enqueued_at)) * 1e3)
            ends.append(seconds(job.ended_at))
    elapsed = (max(ends) if ends else time.time()) - started
    print(
        json.dumps(
            {
                "done": done,
                "failed": failed,
                "seconds": elapsed,
                "submit_seconds": submitted - started,
                "latencies_ms": latencies,
                "driver_cpu_s": me.ru_utime + me.ru_stime,
                "workers_cpu_s": children.ru_utime + children.ru_stime,
            }
        )
    )


if __name__ == "__main__":
    main()
