"""The studio's command line: one subcommand per technique, flags = settings fields.

    python -m studio txt2img --model toy-sd --prompt "a red circle on the left" --out out.png
    python -m studio txt2img --prompts-file prompts.txt --out-dir outs/
    python -m studio sdedit --image in.png --prompt "a blue circle in the center" --strength 0.6 --out out.png
    python -m studio ip2p --image in.png --instruction "make the circle blue" --out out.png
    python -m studio p2p --prompt "a red circle" --edit-prompt "a red square" --mode replace --out-dir p2p/
    python -m studio controlnet --controlnet toy-sd-controlnet-canny --image in.png --prompt "a red circle" --out out.png
    python -m studio ip-adapter --adapter toy-ip-adapter --reference ref.png --prompt "a shape on the left" --out out.png
    python -m studio instantid --model sdxl-base --face face.jpg --prompt "a portrait, oil painting" --out out.png
    python -m studio evaluate --metric fid --metric pickscore --gallery-ids 3,4,5 --out-dir eval/
    python -m studio convert-inception pt_inception-2015-12-05-6726825d.pth   # once: FID over Inception-V3
    python -m studio train --method lora --images stars/ --instance-prompt "a sks shape" --out runs/star
    python -m studio models

Errors a user can cause end the program with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MAX_PROMPTS = 10_000


class CliError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end with one line too, not argparse's usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def lora_arg(text: str):
    from .models import LoraRef

    source, sep, weight = text.rpartition(":")
    if not sep or not source:
        return LoraRef(text, 1.0)
    try:
        return LoraRef(source, float(weight))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora takes PATH[:WEIGHT], not {text!r}") from None


def reweight_arg(text: str):
    from .p2p import Reweight

    word, sep, factor = text.rpartition(":")
    try:
        if sep and word:
            return Reweight(word, float(factor))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--reweight takes WORD:FACTOR, not {text!r}")


def control_arg(text: str) -> tuple[str, float]:
    name, sep, scale = text.rpartition(":")
    if sep and name:
        try:
            return name, float(scale)
        except ValueError:
            pass
    return text, 1.0


def adapter_arg(text: str) -> tuple[str, float | None]:
    """NAME[:SCALE]; None when no scale is given (then --scale applies)."""
    name, sep, scale = text.rpartition(":")
    if sep and name:
        try:
            return name, float(scale)
        except ValueError:
            pass
    return text, None


def gallery_ids_arg(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gallery-ids takes ids like 3,4,5, not {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--gallery-ids takes ids like 3,4,5")
    return ids


def preprocessor_names() -> list[str]:
    from .preprocessors import PREPROCESSORS

    return list(PREPROCESSORS)


def build_parser() -> argparse.ArgumentParser:
    common = OneLineParser(add_help=False)
    common.add_argument("--data-dir", help="where gallery.db and images/ live (default ./data)")
    common.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser = OneLineParser(prog="python -m studio", description="Latent Studio from the command line")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("txt2img", help="text to image", parents=[common])
    t.add_argument("--model", default="toy-sd")
    what = t.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt")
    what.add_argument("--prompts-file", type=Path, help="one prompt a line; writes 0000.png, 0001.png, ...")
    t.add_argument("--negative-prompt", default="")
    t.add_argument("--seed", type=int)
    t.add_argument("--steps", type=int)
    t.add_argument("--guidance", type=float)
    t.add_argument("--width", type=int)
    t.add_argument("--height", type=int)
    t.add_argument("--scheduler")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="PATH[:WEIGHT]")
    t.add_argument("--shift", type=float)
    t.add_argument("--refiner")
    t.add_argument("--refiner-fraction", type=float, default=0.8)
    t.add_argument("--out", type=Path, help="output PNG (with --prompt)")
    t.add_argument("--out-dir", type=Path, help="output folder (with --prompts-file, or for a batch)")
    t.add_argument("--no-gallery", action="store_true", help="do not store into the gallery")

    e = sub.add_parser("sdedit", help="edit an image by a prompt (SDEdit / img2img)", parents=[common])
    e.add_argument("--model", default="toy-sd")
    e.add_argument("--image", type=Path, required=True, help="the picture to edit")
    e.add_argument("--prompt", required=True)
    e.add_argument("--strength", type=float, default=0.6, help="0 keeps the image, 1 is text-to-image")
    e.add_argument("--negative-prompt", default="")
    e.add_argument("--scheduler")
    e.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="PATH[:WEIGHT]")
    e.add_argument("--shift", type=float)
    _edit_arguments(e)

    p = sub.add_parser("ip2p", help="edit an image by an instruction (InstructPix2Pix)", parents=[common])
    p.add_argument("--model", default="toy-instruct-pix2pix")
    p.add_argument("--image", type=Path, required=True, help="the picture to edit")
    p.add_argument("--instruction", required=True)
    p.add_argument("--image-guidance", type=float, help="s_I: how closely to keep the input")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--scheduler")
    _edit_arguments(p)

    q = sub.add_parser(
        "p2p", help="Prompt-to-Prompt: edit a generation by editing its prompt", parents=[common]
    )
    q.add_argument("--model", default="toy-sd")
    q.add_argument("--prompt", required=True, help="the source prompt")
    q.add_argument("--edit-prompt", default="", help="the edited prompt (reweight: leave out)")
    q.add_argument("--mode", default="replace", help="replace (swap words), refine (add words) or reweight")
    q.add_argument(
        "--cross-replace",
        type=float,
        help="share of steps with the source's cross-attention (default: the model's, else 0.8)",
    )
    q.add_argument(
        "--self-replace",
        type=float,
        help="share of steps with the source's self-attention (default: the model's, else 0.4)",
    )
    q.add_argument(
        "--local-blend", nargs="+", default=[], metavar="WORD", help="change only where these words attend"
    )
    q.add_argument("--blend-threshold", type=float, default=0.3)
    q.add_argument("--reweight", type=reweight_arg, action="append", default=[], metavar="WORD:FACTOR")
    q.add_argument(
        "--map-size", type=int, help="latent width of the attention layers shown (default: finest ≤ 16)"
    )
    q.add_argument("--negative-prompt", default="")
    q.add_argument("--scheduler")
    q.add_argument("--seed", type=int)
    q.add_argument("--steps", type=int)
    q.add_argument("--guidance", type=float)
    q.add_argument(
        "--out-dir", type=Path, required=True, help="gets source.png, edited.png and the attention maps"
    )
    q.add_argument("--no-gallery", action="store_true", help="do not store into the gallery")

    c = sub.add_parser(
        "controlnet", help="text to image following control maps (ControlNet, T2I-Adapter)", parents=[common]
    )
    c.add_argument("--model", default="toy-sd")
    c.add_argument(
        "--controlnet",
        type=control_arg,
        action="append",
        required=True,
        metavar="NAME[:SCALE]",
        help="a ControlNet or T2I-Adapter; repeat for several (MultiControlNet)",
    )
    c.add_argument(
        "--image",
        type=Path,
        action="append",
        required=True,
        help="each unit's picture, in --controlnet order (one picture serves them all)",
    )
    c.add_argument(
        "--preprocessor",
        action="append",
        default=[],
        help="each unit's preprocessor (default: the ControlNet's own, else none): "
        + ", ".join(preprocessor_names()),
    )
    c.add_argument("--start", type=float, default=0.0, help="share of the steps before the units start")
    c.add_argument("--end", type=float, default=1.0, help="share of the steps after which they stop")
    c.add_argument("--guess-mode", action="store_true")
    c.add_argument("--prompt", required=True)
    c.add_argument("--negative-prompt", default="")
    c.add_argument("--seed", type=int)
    c.add_argument("--steps", type=int)
    c.add_argument("--guidance", type=float)
    c.add_argument("--width", type=int)
    c.add_argument("--height", type=int)
    c.add_argument("--scheduler")
    c.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="PATH[:WEIGHT]")
    c.add_argument("--out", type=Path, required=True, help="output PNG (the maps go beside it)")
    c.add_argument("--no-gallery", action="store_true", help="do not store into the gallery")

    i = sub.add_parser("ip-adapter", help="text to image with image prompts (IP-Adapter)", parents=[common])
    i.add_argument("--model", default="toy-sd")
    i.add_argument(
        "--adapter",
        type=adapter_arg,
        action="append",
        required=True,
        metavar="NAME[:SCALE]",
        help="an IP-Adapter (catalog name, folder, .safetensors, hub file); repeat for several",
    )
    i.add_argument(
        "--reference",
        type=Path,
        action="append",
        required=True,
        help="a reference picture; repeat for several (one adapter reads them all; several: one each)",
    )
    i.add_argument("--scale", type=float, help="λ of the adapters given without :SCALE (default 1)")
    i.add_argument(
        "--mask", type=Path, action="append", default=[], help="a mask per adapter: white where it acts"
    )
    i.add_argument("--prompt", required=True)
    i.add_argument("--negative-prompt", default="")
    i.add_argument("--seed", type=int)
    i.add_argument("--steps", type=int)
    i.add_argument("--guidance", type=float)
    i.add_argument("--width", type=int)
    i.add_argument("--height", type=int)
    i.add_argument("--scheduler")
    i.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="PATH[:WEIGHT]")
    i.add_argument("--out", type=Path, required=True, help="output PNG")
    i.add_argument("--no-gallery", action="store_true", help="do not store into the gallery")

    f = sub.add_parser(
        "instantid", help="identity-preserving SDXL from a face picture (InstantID)", parents=[common]
    )
    f.add_argument("--model", default="sdxl-base")
    f.add_argument("--face", type=Path, required=True, help="a photo with a visible face")
    f.add_argument("--prompt", required=True)
    f.add_argument("--negative-prompt", default="")
    f.add_argument("--identity-scale", type=float, default=0.8)
    f.add_argument("--keypoint-scale", type=float, default=0.8)
    f.add_argument("--seed", type=int)
    f.add_argument("--steps", type=int)
    f.add_argument("--guidance", type=float)
    f.add_argument("--width", type=int)
    f.add_argument("--height", type=int)
    f.add_argument("--scheduler")
    f.add_argument("--out", type=Path, required=True, help="output PNG (the keypoint map goes beside it)")
    f.add_argument("--no-gallery", action="store_true", help="do not store into the gallery")

    k = sub.add_parser(
        "convert-ip-adapter",
        help="convert a published IP-Adapter .bin (InstantID's ip-adapter.bin) to safetensors, weights only",
        parents=[common],
    )
    k.add_argument("file", type=Path)

    v = sub.add_parser(
        "evaluate",
        help="score models (or pictures) by FID, CLIP-Score, toy GenEval, PickScore, HPSv2",
        parents=[common],
    )
    v.add_argument(
        "--metric",
        action="append",
        required=True,
        help="toy-geneval, clip-score, fid, imagereward, hpsv2, pickscore",
    )
    what = v.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", action="append", help="generate with this model (repeat for several)")
    what.add_argument(
        "--images", type=Path, help="score the PNGs in this folder instead (prompts from their metadata)"
    )
    what.add_argument(
        "--gallery-ids", type=gallery_ids_arg, help="score these gallery pictures instead, e.g. 3,4,5"
    )
    v.add_argument(
        "--prompts",
        type=Path,
        help="a prompt file, one a line (default: toy GenEval's set, or the general list)",
    )
    v.add_argument(
        "--grid",
        default="guidance=4",
        help="one settings axis and its values, e.g. guidance=1,3,5,7, steps=10,25 or lora=0,0.5,1",
    )
    v.add_argument(
        "--lora",
        default="",
        help="the LoRA of --grid lora=...: a catalog name (trained ones too) or .safetensors",
    )
    v.add_argument("--samples", type=int, default=1, help="seeds per prompt")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--steps", type=int)
    v.add_argument("--per-category", type=int, default=12, help="toy GenEval prompts per category")
    v.add_argument("--clip-model", help="a CLIP folder for CLIP-Score and FID features (default: toy-clip)")
    v.add_argument("--reference", type=Path, help="reference pictures for FID (default: toy-world renders)")
    v.add_argument(
        "--fid-features",
        default="auto",
        help="inception, clip, or auto (default): Inception-V3 once convert-inception installed it, else CLIP",
    )
    v.add_argument("--out-dir", type=Path, required=True, help="gets results.json and the plots")
    v.add_argument("--no-gallery", action="store_true", help="do not store the results into the gallery")

    n = sub.add_parser(
        "convert-inception",
        help="convert FID's Inception-V3 .pth (torch-fidelity / pytorch-fid) to safetensors in the library",
        parents=[common],
    )
    n.add_argument(
        "file", type=Path, help="pt_inception-2015-12-05-6726825d.pth (or torch-fidelity's weights-…)"
    )
    h = sub.add_parser(
        "convert-hpsv2",
        help="convert HPS v2's checkpoint (HPS_v2_compressed.pt) to safetensors in the library",
        parents=[common],
    )
    h.add_argument("file", type=Path, help="HPS_v2_compressed.pt from xswu/HPSv2")
    h.add_argument("--arch", default="ViT-H-14", help="the open_clip architecture it fine-tunes")
    r = sub.add_parser(
        "convert-image-reward",
        help="convert ImageReward's checkpoint (ImageReward.pt) to safetensors in the library",
        parents=[common],
    )
    r.add_argument("file", type=Path, help="ImageReward.pt from THUDM/ImageReward")
    r.add_argument("--med-config", type=Path, help="its med_config.json (default: the one beside FILE)")

    a = sub.add_parser(
        "convert-annotator",
        help="convert a published annotator .pth to safetensors (weights only)",
        parents=[common],
    )
    a.add_argument("file", type=Path, help="e.g. ControlNetHED.pth from lllyasviel/Annotators")

    _train_arguments(sub.add_parser("train", help="LoRA, DreamBooth or Textual Inversion", parents=[common]))
    sub.add_parser("models", help="list the catalog", parents=[common])
    return parser


def _train_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--method", default="lora", help="lora, dreambooth or textual-inversion")
    r.add_argument("--model", default="toy-sd")
    r.add_argument("--images", type=Path, help="a folder of pictures (captions: same-name .txt files)")
    r.add_argument("--instance-prompt", default="a sks shape")
    r.add_argument(
        "--class-prompt",
        action="append",
        default=[],
        help="prior preservation's class, e.g. 'a shape'; repeat it for a regularisation set of several",
    )
    r.add_argument("--prior-preservation", action="store_true")
    r.add_argument("--prior-weight", type=float, default=1.0)
    r.add_argument(
        "--prior-target",
        default="base-model",
        help="what the prior term regresses to: base-model (the frozen base model's prediction) "
        "or class-pictures (the noise that made the noisy class picture, Ruiz et al.)",
    )
    r.add_argument("--class-images", type=int, default=50)
    r.add_argument("--steps", type=int)
    r.add_argument("--learning-rate", type=float, default=1e-4)
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--rank", type=int, default=4)
    r.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    r.add_argument(
        "--targets", help="LoRA target modules, comma-separated (default: to_q,to_k,to_v,to_out.0)"
    )
    r.add_argument("--train-text-encoder", action="store_true")
    r.add_argument("--token", default="<sks>", help="textual inversion's new word")
    r.add_argument("--initializer", default="shape", help="textual inversion's starting word")
    r.add_argument("--resolution", type=int)
    r.add_argument("--mixed-precision", default="no", help="no, fp16 or bf16 (GPU)")
    r.add_argument("--gradient-checkpointing", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--checkpoint-every", type=int, default=250)
    r.add_argument("--sample-every", type=int, default=250)
    r.add_argument("--name", default="", help="the output's name (default: method and model)")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="the run's folder: checkpoints, samples and the output")
    where.add_argument("--resume", type=Path, help="continue the run in this folder (--steps may extend it)")


def _edit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="text guidance (CFG)")
    parser.add_argument("--fit", default="crop", help="crop or resize the input to a multiple of 8")
    parser.add_argument("--out", type=Path, required=True, help="output PNG")
    parser.add_argument("--no-gallery", action="store_true", help="do not store into the gallery")


def txt2img_command(args, studio) -> int:
    from .pngmeta import write_png
    from .service import infotext
    from .txt2img import Txt2ImgSettings

    if args.prompt is not None:
        prompts = [args.prompt]
        if not args.out and not args.out_dir:
            raise CliError("give --out FILE.png (or --out-dir DIR)")
    else:
        if not args.out_dir:
            raise CliError("--prompts-file needs --out-dir DIR")
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {args.prompts_file}: {exc}") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise CliError(f"{args.prompts_file} has no prompts")
        if len(prompts) > MAX_PROMPTS:
            raise CliError(f"{args.prompts_file} has {len(prompts)} prompts; at most {MAX_PROMPTS}")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for prompt in prompts:
        settings = Txt2ImgSettings(
            prompt=prompt,
            model=args.model,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            width=args.width,
            height=args.height,
            scheduler=args.scheduler,
            batch_size=args.batch_size,
            loras=tuple(args.lora),
            shift=args.shift,
            refiner=args.refiner,
            refiner_fraction=args.refiner_fraction,
        )
        result, _ = studio.txt2img(settings, store=not args.no_gallery)
        for index, image in enumerate(result.images):
            if args.out and len(prompts) == 1 and len(result.images) == 1:
                path = args.out
            else:
                path = args.out_dir / f"{written:04d}.png"
            s = result.image_settings(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(path, image, infotext(s, result.family), s.to_dict())
            print(f"{path}\tseed {s.seed}")
            written += 1
    return 0


def edit_command(args, studio) -> int:
    """sdedit / ip2p: one edited image to --out; with the gallery, the input becomes its parent."""
    from .ip2p import InstructPix2PixSettings
    from .sdedit import SDEditSettings

    common = dict(
        model=args.model,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        fit=args.fit,
    )
    if args.command == "sdedit":
        settings = SDEditSettings(
            prompt=args.prompt, strength=args.strength, loras=tuple(args.lora), shift=args.shift, **common
        )
        result, items = studio.sdedit(settings, args.image, store=not args.no_gallery)
    else:
        settings = InstructPix2PixSettings(
            instruction=args.instruction, image_guidance=args.image_guidance, **common
        )
        result, items = studio.ip2p(settings, args.image, store=not args.no_gallery)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return _write_one(args.out, result, items)


def p2p_command(args, studio) -> int:
    """source.png, edited.png (its child in the gallery) and the two attention-map sheets."""
    from .p2p import PromptToPromptSettings
    from .pngmeta import write_png
    from .service import infotext

    settings = PromptToPromptSettings(
        prompt=args.prompt,
        edit_prompt=args.edit_prompt,
        mode=args.mode,
        model=args.model,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        cross_replace=args.cross_replace,
        self_replace=args.self_replace,
        local_blend=tuple(w for words in args.local_blend for w in words.replace(",", " ").split()),
        blend_threshold=args.blend_threshold,
        reweight=tuple(args.reweight),
        map_size=args.map_size,
    )
    result, items = studio.p2p(settings, store=not args.no_gallery)
    s = result.settings
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, image, prompt in (
        ("source", result.images[0], s.prompt),
        ("edited", result.images[1], s.edited_prompt),
    ):
        path = args.out_dir / f"{name}.png"
        write_png(path, image, infotext(s, result.family, prompt), s.to_dict())
        print(f"{path}\tseed {s.seed}")
    for label, sheet in result.figures.items():
        path = args.out_dir / f"attention_{label.split()[0]}.png"
        sheet.save(path)
        print(path)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if items:
        print(f"gallery #{items[0].id} (source), #{items[1].id} (edited, child of #{items[0].id})")
    return 0


def controlnet_command(args, studio) -> int:
    """One image to --out, each unit's map beside it as OUT.map1.png, ...; maps are the parents."""
    from .controlnet import ControlNetSettings, ControlUnit

    n = len(args.controlnet)
    images = args.image if len(args.image) == n else args.image * n if len(args.image) == 1 else None
    if images is None:
        raise CliError(f"{n} --controlnet but {len(args.image)} --image: give one picture, or one for each")
    if args.preprocessor and len(args.preprocessor) != n:
        raise CliError(f"{n} --controlnet but {len(args.preprocessor)} --preprocessor: give one for each")
    units = []
    for i, (name, scale) in enumerate(args.controlnet):
        if args.preprocessor:
            preprocessor = args.preprocessor[i]
        else:
            preprocessor = studio.models.resolve_control(name).defaults.get("preprocessor", "none")
        units.append(
            ControlUnit(model=name, scale=scale, start=args.start, end=args.end, preprocessor=preprocessor)
        )
    settings = ControlNetSettings(
        prompt=args.prompt,
        model=args.model,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        loras=tuple(args.lora),
        units=tuple(units),
        guess_mode=args.guess_mode,
    )
    result, items = studio.controlnet(settings, images, store=not args.no_gallery)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for i in range(n):
        path = args.out.with_suffix(f".map{i + 1}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        result.figures[f"control map {i + 1}"].save(path)
        print(path)
    return _write_one(args.out, result, items)


def ip_adapter_command(args, studio) -> int:
    """One image to --out; the references (and masks) are stored as its parents in the gallery."""
    from .ip_adapter import IPAdapterSettings, IPAdapterUnit

    n, refs = len(args.adapter), len(args.reference)
    if n > 1 and refs != n:
        raise CliError(f"{n} --adapter but {refs} --reference: with several adapters give one reference each")
    if args.mask and len(args.mask) != n:
        raise CliError(f"{n} --adapter but {len(args.mask)} --mask: give one mask for each adapter, or none")
    default_scale = 1.0 if args.scale is None else args.scale
    units = tuple(
        IPAdapterUnit(
            adapter=name,
            scale=default_scale if scale is None else scale,
            references=refs if n == 1 else 1,
            masked=bool(args.mask),
        )
        for name, scale in args.adapter
    )
    settings = IPAdapterSettings(
        prompt=args.prompt,
        model=args.model,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        loras=tuple(args.lora),
        units=units,
    )
    result, items = studio.ip_adapter(settings, args.reference, args.mask, store=not args.no_gallery)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return _write_one(args.out, result, items)


def instantid_command(args, studio) -> int:
    from .instantid import InstantIDSettings

    settings = InstantIDSettings(
        prompt=args.prompt,
        model=args.model,
        negative_prompt=args.negative_prompt,
        identity_scale=args.identity_scale,
        keypoint_scale=args.keypoint_scale,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
    )
    result, items = studio.instantid(settings, args.face, store=not args.no_gallery)
    path = args.out.with_suffix(".keypoints.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    result.figures["face keypoints"].save(path)
    print(path)
    return _write_one(args.out, result, items)


def convert_ip_adapter_command(args, studio) -> int:
    from .instantid import convert_ip_adapter

    print(convert_ip_adapter(args.file))
    return 0


def convert_inception_command(args, studio) -> int:
    """FID's Inception-V3 weights into the library's metrics folder, where evaluations find them."""
    from .evaluate import metrics_folder
    from .inception import WEIGHTS_NAME, convert_inception

    print(convert_inception(args.file, metrics_folder(studio.models) / WEIGHTS_NAME))
    return 0


def convert_hpsv2_command(args, studio) -> int:
    from .evaluate import metrics_folder
    from .preference import HPSV2_NAME, convert_hpsv2

    print(convert_hpsv2(args.file, metrics_folder(studio.models) / HPSV2_NAME, args.arch))
    return 0


def convert_image_reward_command(args, studio) -> int:
    from .evaluate import metrics_folder
    from .image_reward import WEIGHTS_NAME, convert_image_reward

    print(convert_image_reward(args.file, metrics_folder(studio.models) / WEIGHTS_NAME, args.med_config))
    return 0


def evaluate_command(args, studio) -> int:
    """results.json (one key per metric) and one PNG per figure in --out-dir."""
    import json

    from .evaluate import EvaluationSettings

    axis, sep, values = args.grid.partition("=")
    if not sep or not values.strip():
        raise CliError(f"--grid takes AXIS=V1,V2,..., not {args.grid!r}")
    prompts = ()
    if args.prompts:
        prompts = tuple(_read_lines(args.prompts))
    metrics = tuple(args.metric)
    scoring = args.images is not None or args.gallery_ids is not None
    prompt_set = "custom" if prompts else "toy-geneval" if "toy-geneval" in metrics or scoring else "general"
    extra = {"clip_model": args.clip_model} if args.clip_model else {}
    settings = EvaluationSettings(
        metrics=metrics,
        models=tuple(args.model or ("pictures",)),
        prompt_set=prompt_set,
        prompts=prompts,
        axis=axis.strip(),
        values=tuple(v.strip() for v in values.split(",") if v.strip()),
        samples=args.samples,
        seed=args.seed,
        steps=args.steps,
        per_category=args.per_category,
        reference=str(args.reference) if args.reference else None,
        lora=args.lora,
        images=str(args.images) if args.images else None,
        gallery_ids=args.gallery_ids or (),
        fid_features=args.fid_features,
        **extra,
    )

    def progress(done, total):
        print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)

    report, record = studio.evaluate(settings, on_progress=progress, store=not args.no_gallery)
    print(file=sys.stderr)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = report.results()
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, picture in report.figures.items():
        picture.save(args.out_dir / (name.replace(" ", "_") + ".png"))
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps({k: v for k, v in results.items() if k in metrics}))
    if record is not None:
        print(f"stored as evaluation #{record.id}")
    return 0


def _read_lines(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    if not lines:
        raise CliError(f"{path} has no lines")
    return lines


def train_command(args, studio) -> int:
    """Train as a job, printing progress; Ctrl-C cancels at a checkpoint that --resume continues."""
    import json

    from .settings import SettingsError
    from .training.settings import ATTENTION_TARGETS, TrainingSettings

    if args.resume:
        try:
            settings = TrainingSettings.from_dict(json.loads((args.resume / "settings.json").read_text()))
        except (OSError, ValueError) as exc:
            if isinstance(exc, SettingsError):
                raise
            raise CliError(
                f"--resume {args.resume}: no readable settings.json of a training run there"
            ) from None
        if args.steps:
            settings = settings.replace(steps=args.steps)
        out = args.resume
    else:
        if not args.images:
            raise CliError("--images is required (a folder of pictures)")
        targets = (
            tuple(t.strip() for t in args.targets.split(",") if t.strip())
            if args.targets
            else ATTENTION_TARGETS
        )
        settings = TrainingSettings(
            method=args.method,
            model=args.model,
            images=str(args.images),
            instance_prompt=args.instance_prompt,
            class_prompt="\n".join(args.class_prompt),
            prior_preservation=args.prior_preservation,
            prior_weight=args.prior_weight,
            prior_target=args.prior_target,
            class_images=args.class_images,
            steps=args.steps or 1000,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            rank=args.rank,
            alpha=args.alpha if args.alpha is not None else float(args.rank),
            targets=targets,
            train_text_encoder=args.train_text_encoder,
            token=args.token,
            initializer=args.initializer,
            resolution=args.resolution,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            sample_every=args.sample_every,
            name=args.name,
        )
        out = args.out
    job = studio.start_training(settings, out_dir=out)
    shown = -1
    try:
        while not (state := studio.jobs.wait(job, timeout=2.0)).finished:
            if state.total and state.step != shown:  # nothing to say while it waits for the lane
                loss = state.metrics[-1].get("loss") if state.metrics else None
                print(
                    f"step {state.step}/{state.total}" + (f"\tloss {loss:.4f}" if loss is not None else ""),
                    flush=True,
                )
                shown = state.step
    except KeyboardInterrupt:
        studio.jobs.cancel(job)
        state = studio.jobs.wait(job)
        print(f"error: cancelled at step {state.step}; continue with --resume {out}", file=sys.stderr)
        return 130
    if state.status != "done":
        print(f"error: training {state.status}: {state.error or state.message}", file=sys.stderr)
        return 1
    print(
        f"{state.result['output']}\t{state.result['steps']} steps in {state.result['seconds']} s\tjob #{job}"
    )
    return 0


def convert_annotator_command(args, studio) -> int:
    from .preprocessors import convert_annotator

    print(convert_annotator(args.file))
    return 0


def _write_one(out: Path, result, items) -> int:
    from .pngmeta import write_png
    from .service import infotext

    s = result.image_settings(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(out, result.images[0], infotext(s, result.family), s.to_dict())
    stored = f"\tgallery #{items[0].id} (parent #{items[0].parent_id})" if items else ""
    print(f"{out}\tseed {s.seed}{stored}")
    return 0


def models_command(_args, studio) -> int:
    for spec in studio.models.catalog.values():
        print(f"{spec.name:20s} {spec.kind:8s} {spec.family:12s} {spec.source}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .gallery import GalleryError
    from .models import ModelError, ModelManager
    from .service import Paths, Studio
    from .settings import SettingsError

    studio = Studio(Paths.from_env(args.data_dir), ModelManager(device=args.device))
    commands = {
        "txt2img": txt2img_command,
        "sdedit": edit_command,
        "ip2p": edit_command,
        "p2p": p2p_command,
        "controlnet": controlnet_command,
        "ip-adapter": ip_adapter_command,
        "instantid": instantid_command,
        "convert-ip-adapter": convert_ip_adapter_command,
        "convert-annotator": convert_annotator_command,
        "convert-inception": convert_inception_command,
        "convert-hpsv2": convert_hpsv2_command,
        "convert-image-reward": convert_image_reward_command,
        "evaluate": evaluate_command,
        "train": train_command,
        "models": models_command,
    }
    try:
        return commands[args.command](args, studio)
    except (CliError, SettingsError, ModelError, GalleryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-made was stored", file=sys.stderr)
        return 130
    finally:
        studio.close()


if __name__ == "__main__":
    raise SystemExit(main())
