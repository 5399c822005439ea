"""`tuneprod` on the command line: thin subcommands over tuneprod.api. A user error prints one line on stderr
and exits with status 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from tuneprod import api


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"the value is {text!r}, but must be an integer >= 1")
    return int(text)


def _views(text: str) -> tuple[str, ...]:
    from tuneprod.spec import TTA_VIEWS

    views = () if text == "none" else tuple(text.split(","))
    if not all(view in TTA_VIEWS for view in views) or len(set(views)) != len(views):
        raise argparse.ArgumentTypeError(f"the value is {text!r}, but must be views from {', '.join(TTA_VIEWS)} "
                                         f"joined by commas (e.g. flip,scale), or none")
    return views


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneprod", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = commands.add_parser("search", help="search a space, train the final model(s), predict the test set",
                                 description="Runs the trials a search-space YAML describes (Ray Tune, Optuna, ASHA), "
                                             "writes trials.parquet/.csv and best_config.yaml, then trains the final "
                                             "stage (the best configurations on all labelled data) into "
                                             "<experiment>/final and writes <experiment>/predictions.csv when "
                                             "data.test is set.")
    search.add_argument("space", type=Path, help="search-space YAML, e.g. search_spaces/demo.yaml")
    search.add_argument("--data", help="images to use instead of the YAML's: a class-per-folder tree, a path,label "
                                       "CSV/Parquet manifest, or a folder holding train/ and test/; a local path or "
                                       "a bucket's (s3://bucket/prefix, gs://...)")
    search.add_argument("--test", help="unlabelled images to predict at the end (replaces data.test); a local path "
                                       "or a bucket's")
    search.add_argument("--num-samples", type=_positive_int, help="number of trials (replaces search.num_samples)")
    search.add_argument("--name", help="experiment name (default: the YAML's name or file stem)")
    search.add_argument("--storage", help="where experiments go: a folder (default: ./tuneprod_runs), or a bucket "
                                          "(s3://bucket/prefix, gs://...; a cluster without a shared folder needs one)")
    search.add_argument("--address", help="Ray cluster to join, e.g. auto (default: start Ray on this machine)")
    search.add_argument("--no-retrain", action="store_true", help="stop after the search (no final stage)")
    search.add_argument("--verbose", action="store_true", help="Ray's own progress tables, warnings and trial output "
                                                               "instead of tuneprod's one-line view")

    resume = commands.add_parser("resume", help="continue an interrupted search",
                                 description="Continues a search that was interrupted (Ctrl-C, a lost driver): "
                                             "unfinished trials restart from their last checkpoint; then retrains "
                                             "and predicts like search.")
    resume.add_argument("experiment", help="experiment folder, e.g. tuneprod_runs/demo, or its bucket folder "
                                        "(s3://bucket/tuneprod_runs/demo)")
    resume.add_argument("--address", help="Ray cluster to join (default: start Ray on this machine)")
    resume.add_argument("--no-retrain", action="store_true", help="stop after the search")
    resume.add_argument("--verbose", action="store_true", help="Ray's own output (as for search)")

    report = commands.add_parser("report", help="write an experiment's report.html",
                                 description="Writes <experiment>/report.html, one page that opens offline: the "
                                             "trials, their learning curves with the scheduler's rungs and stops, "
                                             "parameter importances, parallel coordinates, the final model and its "
                                             "misclassified test images. A search writes it when it ends.")
    report.add_argument("experiment", help="experiment folder, e.g. tuneprod_runs/demo, or its bucket folder "
                                        "(s3://bucket/tuneprod_runs/demo)")

    dashboard = commands.add_parser("dashboard", help="watch a search live in optuna-dashboard",
                                    description="Serves optuna-dashboard on the experiment's study.db, while the "
                                                "search runs or after: history, each trial's learning curve, "
                                                "parallel coordinates, importances.")
    dashboard.add_argument("experiment", help="experiment folder, e.g. tuneprod_runs/demo, or its bucket folder "
                                        "(s3://bucket/tuneprod_runs/demo)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                                                              "machine only; reach a cluster's with ssh -L)")
    dashboard.add_argument("--port", type=_positive_int, default=8080, help="default: %(default)s")

    retrain = commands.add_parser("retrain", help="run an experiment's final stage again",
                                  description="Trains the final stage's members (the best distinct configurations, "
                                              "final.members x final.seeds) on train + validation images into "
                                              "<experiment>/final, and predicts data.test when it is set.")
    retrain.add_argument("experiment", help="experiment folder, e.g. tuneprod_runs/demo, or its bucket folder "
                                        "(s3://bucket/tuneprod_runs/demo)")
    retrain.add_argument("--address", help="Ray cluster to train the members on (default: this machine)")

    predict = commands.add_parser("predict", help="predict labels for a folder of images",
                                  description="Writes file,label,confidence,top5_labels,top5_confidences,error (a row "
                                              "without a label for an unreadable image); prints the "
                                              "accuracy when a test_labels.csv (file,label) sits beside the images.")
    predict.add_argument("model", help="model folder, e.g. tuneprod_runs/demo/final, or its bucket folder; or a "
                                       "model.onnx from tuneprod export (run by onnxruntime, without torch)")
    predict.add_argument("images", type=Path, help="folder of images (searched recursively) or one image")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default: %(default)s)")
    predict.add_argument("--tta", type=_views, metavar="VIEWS",
                         help="test-time views to average, comma-separated from flip, scale, crops, or none "
                              "(default: as the model was saved)")
    predict.add_argument("--no-tta", dest="tta", action="store_const", const=(), help="same as --tta none")
    predict.add_argument("--batch-size", type=_positive_int, default=64, help="default: %(default)s")

    export = commands.add_parser("export", help="write a final model as one ONNX file",
                                 description="Writes the whole ensemble (normalisation, test-time views, softmax, the "
                                             "soft vote, gallery scoring) as one ONNX graph: uint8 RGB images N x H x W "
                                             "x 3 at the model's image size in, class probabilities out; class names, "
                                             "image size and views in its metadata and in labels.json beside it. Needs "
                                             "pip install 'tuneprod[export]'.")
    export.add_argument("model", help="model folder, e.g. tuneprod_runs/demo/final, or its bucket folder")
    export.add_argument("--out", type=Path, help="ONNX file to write (default: model.onnx beside the model "
                                                 "folder; for a bucket folder, model.onnx here)")
    export.add_argument("--tta", type=_views, metavar="VIEWS",
                        help="test-time views inside the graph, comma-separated from flip, scale, crops, or none "
                             "(default: as the model was saved)")

    demo = commands.add_parser("demo-data", help="generate the synthetic product image set",
                               description="Writes DIR/train/<class>/*.png (views from 0 and 30 degrees elevation) and "
                                           "DIR/test/*.png (0, 30 and 60 degrees) with DIR/test/test_labels.csv.")
    demo.add_argument("out_dir", type=Path, metavar="DIR")
    demo.add_argument("--classes", type=int, default=10, help="default: %(default)s")
    demo.add_argument("--train-per-class", type=int, default=16, help="default: %(default)s")
    demo.add_argument("--test-per-class", type=int, default=12, help="default: %(default)s")
    demo.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "search":
        outcome = api.search(args.space, data=args.data, test=args.test, num_samples=args.num_samples,
                             name=args.name, storage=args.storage, address=args.address,
                             retrain=not args.no_retrain, verbose=args.verbose)
        _print_done(outcome.experiment_dir, outcome.remote)
    elif args.command == "resume":
        outcome = api.resume(args.experiment, address=args.address, retrain=not args.no_retrain,
                             verbose=args.verbose)
        _print_done(outcome.experiment_dir, outcome.remote)
    elif args.command == "report":
        print(f"report: written to {api.report(args.experiment)}")
    elif args.command == "dashboard":
        api.dashboard(args.experiment, host=args.host, port=args.port)
    elif args.command == "retrain":
        api.retrain(args.experiment, address=args.address)
    elif args.command == "predict":
        report = api.predict(args.model, args.images, args.out, tta=args.tta, batch_size=args.batch_size)
        print(f"predict: {report.images} predictions written to {report.out}")
        if report.accuracy is not None:
            print(f"predict: accuracy {report.summary()} against test_labels.csv")
    elif args.command == "export":
        print(f"export: written to {api.export(args.model, args.out, tta=args.tta)}")
    else:
        summary = api.demo_data(args.out_dir, classes=args.classes, train_per_class=args.train_per_class,
                                test_per_class=args.test_per_class, size=args.size, seed=args.seed)
        print(f"demo-data: {summary['classes']} classes, {summary['train_images']} training and "
              f"{summary['test_images']} test images in {summary['path']}")


def _print_done(experiment_dir: Path, remote: Optional[str]) -> None:
    written = [name for name in ("trials.csv", "best_config.yaml", "final/", "predictions.csv", "report.html")
               if (experiment_dir / name.rstrip("/")).exists()]
    where = remote or experiment_dir
    mirror = f" (and on this machine in {experiment_dir})" if remote else ""
    print(f"tuneprod: done; results in {where}{mirror} ({', '.join(written)}). "
          f"Look back with `tuneprod dashboard {where}` or `tensorboard --logdir {where}`")


def main(argv: Optional[list[str]] = None) -> int:
    from tuneprod.spec import SearchInterrupted, UserError

    args = _parser().parse_args(argv)
    try:
        _run(args)
    except SearchInterrupted as exc:
        print(f"tuneprod {args.command}: interrupted: {exc}", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"tuneprod {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tuneprod {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
