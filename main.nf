#!/usr/bin/env nextflow
/*
 * bmseg: every megakaryocyte (MK) and haematopoietic stem/progenitor cell (HSPC) in whole-slide
 * bone-marrow images found, measured and classified.
 *
 * This entry workflow only turns params into channels (a samplesheet or a glob of slides, or
 * synthetic slides and the demo models for -profile test) and hands them to BMSEG.
 * Usage and profiles: docs/pipeline.md.
 */
include { validateParameters; paramsSummaryLog; samplesheetToList } from 'plugin/nf-schema'
include { SYNTH      } from './modules/local/synth'
include { DEMOMODELS } from './modules/local/demomodels'
include { BMSEG      } from './workflows/bmseg'

/*
 * The slide id `bmseg plan` gives a file when no --slide-id is passed (bmseg.slide's
 * default_slide_id, the one rule; tests/test_nextflow.py applies these patterns and checks
 * them against it): the file name without its extension (.ome.tif(f) as one; a leading dot
 * is no extension), every character outside [A-Za-z0-9._-] replaced by '_', then a leading
 * '.' or '-' (no hidden files, no flag-like ids), 'slide' when nothing is left. Patterns
 * only, no other logic, so the test reads them as data.
 */
def slideId(String name) {
    return name
        .replaceFirst('(?i)\\.ome\\.tiff?$|(?<=.)\\.[^.]+$', '')
        .replaceAll('[^A-Za-z0-9._-]', '_')
        .replaceFirst('^[.-]', '_')
        .replaceFirst('^$', 'slide')
}

/*
 * Whether a slide's file name can stand on a task's command line as it is: tasks stage each
 * slide under its own name, and a space, quote or shell character there would split or
 * break the command.
 */
def safeFileName(String name) {
    return name.matches('[A-Za-z0-9._+-]+')
}

/* The slides with names a command line cannot take, as one error naming them. */
def refuseUnsafeNames(slides) {
    def unsafe = slides.findAll { slide -> !safeFileName(slide.name) }
    if (unsafe) {
        error("${unsafe.size()} slide file names hold spaces or characters a task's command line cannot take, e.g. '${unsafe[0]}': rename them to letters, digits, '.', '_', '+' and '-'")
    }
}

workflow {
    main:
    // Under the strict parser (the default since 26.04) CLI params arrive as strings: the cast
    // types nf-schema's copy for validation; the script converts what it reads itself.
    validateParameters(cast_cli_params: true)
    log.info(paramsSummaryLog(workflow))

    def n_synth = params.synth_slides as Integer
    if (!params.input && n_synth == 0) {
        error("--input is missing: give a samplesheet (.csv) or a quoted glob of slides, e.g. --input 'slides/*.czi' (or use -profile test)")
    }
    if (params.labels && params.classifiers) {
        error("--labels and --classifiers both given: pass --labels to train new classifiers, or --classifiers to apply existing ones")
    }
    if (params.page_order == 'uncertainty' && !params.labels && !params.classifiers) {
        error("--page_order uncertainty needs classifiers: pass --labels or --classifiers, or use --page_order random")
    }
    if (n_synth == 0 && !params.models_dir && !params.baked_models.toString().toBoolean()) {
        error("--models_dir is missing: fill a folder once with `bmseg models fetch --dest DIR` and pass --models_dir DIR (or --baked_models true for an image built with --bake-models)")
    }

    ch_versions = channel.empty()
    ch_slides = channel.empty()
    ch_models = channel.empty()
    if (n_synth > 0) {
        // -profile test: tiny synthetic slides, brightfield (odd) and fluorescence (even), and
        // the demo models made here, no downloads.
        SYNTH(channel.of(1..n_synth).map { i -> ["synth${i}", i, i % 2 == 1 ? 'brightfield' : 'fluorescence'] })
        DEMOMODELS()
        ch_slides = SYNTH.out.slide.map { slide_id, modality, czi -> [[id: slide_id, pixel_size_um: null, modality: modality], czi] }
        ch_models = DEMOMODELS.out.models
        ch_versions = ch_versions.mix(SYNTH.out.versions, DEMOMODELS.out.versions)
    } else {
        if (params.input.toString().endsWith('.csv')) {
            def rows = samplesheetToList(params.input, "${projectDir}/assets/schema_input.json")
            refuseUnsafeNames(rows.collect { row -> row[1] })
            ch_slides = channel
                .fromList(rows)
                .map { meta, slide -> [meta + [pixel_size_um: meta.pixel_size_um ?: params.pixel_size_um], slide] }
        } else {
            // A glob: each file's id by bmseg's own rule, and no two files with one id (e.g.
            // data/*/slide.czi), which would overwrite each other's results.
            def slides = files(params.input, checkIfExists: true).sort { slide -> slide.toString() }
            if (!slides) {
                error("--input ${params.input}: no slide matches; quote the glob, e.g. --input 'slides/*.czi'")
            }
            refuseUnsafeNames(slides)
            def by_id = slides.groupBy { slide -> slideId(slide.name) }
            def shared = by_id.findAll { slide_id, same -> same.size() > 1 }
            if (shared) {
                def first = shared.keySet().first()
                error("--input ${params.input}: ${shared.size()} slide ids are taken by more than one file, e.g. '${first}' by ${shared[first].join(', ')}; give each slide its own id with a samplesheet (--input slides.csv)")
            }
            ch_slides = channel
                .fromList(slides)
                .map { slide -> [[id: slideId(slide.name), pixel_size_um: params.pixel_size_um, modality: null], slide] }
        }
        // An empty list stages nothing: SEGMENT then reads the image's baked-in weights.
        ch_models = params.models_dir
            ? channel.value(file(params.models_dir, checkIfExists: true))
            : channel.value([])
    }

    ch_classifiers = params.classifiers
        ? channel.value(file(params.classifiers, checkIfExists: true))
        : channel.empty()
    ch_labels = params.labels
        ? channel.fromPath(params.labels, checkIfExists: true)
        : channel.empty()

    def calibrate = params.tissue_calibration.toString().toBoolean()
    BMSEG(ch_slides, calibrate, ch_models, ch_classifiers, ch_labels)

    // One versions file for the whole run: every process's block, each once.
    BMSEG.out.versions
        .mix(ch_versions)
        .unique { versions -> versions.text }
        .collectFile(storeDir: "${params.outdir}/pipeline_info", name: 'bmseg_versions.yml', sort: true, newLine: true)

    onComplete:
    log.info(workflow.success
        ? "bmseg finished: results in ${params.outdir}, run report in ${params.outdir}/report.html"
        : "bmseg stopped: fix the cause above and add -resume to redo only the tasks that failed")
}
