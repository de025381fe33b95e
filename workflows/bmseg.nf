/*
 * The bmseg DAG and nothing else: which step feeds which. Every step is one process that calls
 * one `bmseg` command; resources, containers and flags live in conf/.
 *
 *   slides -> (CALIBRATE) -> PLAN (per slide) -> BATCH -> SEGMENT (per batch) -> GATHER
 *          -> TRAIN (given labels) -> CLASSIFY (given labels or classifiers)
 *          -> PAGES (when there are cells) -> REPORT
 */
include { CALIBRATE } from '../modules/local/calibrate'
include { PLAN      } from '../modules/local/plan'
include { BATCH     } from '../modules/local/batch'
include { SEGMENT   } from '../modules/local/segment'
include { GATHER    } from '../modules/local/gather'
include { TRAIN     } from '../modules/local/train'
include { FINETUNE  } from '../modules/local/finetune'
include { CLASSIFY  } from '../modules/local/classify'
include { PAGES     } from '../modules/local/pages'
include { REPORT    } from '../modules/local/report'

// Every collected list is sorted: tasks finish in any order, and a list in another order is
// another input to -resume, which would redo everything downstream of it.

workflow BMSEG {
    take:
    ch_slides      // channel: [ meta (id, pixel_size_um), slide file ], one per slide
    calibrate      // boolean: one tissue threshold for all slides (CALIBRATE) instead of per slide
    ch_models      // value channel: the models directory
    ch_classifiers // channel: a classifiers directory, or empty
    ch_labels      // channel: label JSON files, or empty

    main:
    ch_versions = channel.empty()
    ch_calibration = channel.value([])
    if (calibrate) {
        // Every slide with its own pixel size, sorted by slide id (ids are unique, names not).
        ch_calibrate = ch_slides
            .map { meta, slide -> [meta.id, meta.pixel_size_um, slide] }
            .collect(flat: false, sort: { entry -> entry[0] })
            .map { entries -> [entries.collect { entry -> entry[1] }, entries.collect { entry -> entry[2] }] }
        CALIBRATE(ch_calibrate)
        ch_calibration = CALIBRATE.out.calibration
        ch_versions = ch_versions.mix(CALIBRATE.out.versions)
    }
    PLAN(ch_slides, ch_calibration)

    BATCH(PLAN.out.tiles.map { meta, tiles -> tiles }.collect(sort: { tiles -> tiles.name }))

    // Each slide beside its PLAN record (slide.json), by id.
    ch_slides_planned = ch_slides
        .map { meta, slide -> [meta.id, slide] }
        .join(PLAN.out.plan.map { meta, plan -> [meta.id, plan] }, failOnMismatch: true)

    // One SEGMENT task per batch table, keyed by its name (batch_0000, ...): a failed batch is
    // the only task a resumed run redoes. Each task stages only the slides its batch reads
    // (BATCH's batch_NNNN.slides.json), each with its id and slide.json, sorted by id: a task downloads no
    // other slide, and a changed slide redoes only the batches that read it.
    ch_batches = BATCH.out.batches
        .flatten()
        .map { batch -> [batch.baseName, batch] }
    ch_batch_slides = BATCH.out.slide_lists
        .flatten()
        .flatMap { slide_list ->
            def batch_id = slide_list.name - '.slides.json'
            new groovy.json.JsonSlurper().parseText(slide_list.text).collect { slide_id -> [slide_id, batch_id] }
        }
        .combine(ch_slides_planned, by: 0)
        .map { slide_id, batch_id, slide, plan -> [batch_id, slide_id, slide, plan] }
        .groupTuple()
        .map { batch_id, slide_ids, slides, plans ->
            def rows = [slide_ids, slides, plans].transpose().sort { row -> row[0] }
            [batch_id, rows.collect { row -> row[0] }, rows.collect { row -> row[1] }, rows.collect { row -> row[2] }]
        }
    SEGMENT(ch_batches.join(ch_batch_slides, failOnMismatch: true), ch_models)

    // GATHER reads each slide's plan (slide.json, tiles, tissue picture) from one folder.
    ch_plans = PLAN.out.plan
        .mix(PLAN.out.tiles, PLAN.out.tissue)
        .map { meta, plan_file -> plan_file }
        .collect(sort: { plan_file -> plan_file.name })
    ch_batch_outputs = SEGMENT.out.cells
        .map { batch_id, cells -> cells }
        .collect(sort: { cells -> cells.name })
    GATHER(ch_batch_outputs, ch_plans)

    // Labels train new classifiers; given classifiers are applied as they are. Either way the
    // classifiers only add columns to the gathered tables: nothing is segmented again.
    // CLASSIFY also ranks the unlabelled cells by uncertainty, leaving out the labelled ones.
    ch_label_files = ch_labels.collect(sort: { labels -> labels.name })
    TRAIN(GATHER.out.gathered, ch_label_files)
    // --finetune: Cellpose-SAM trained on the HSPCs the labels accept, from SEGMENT's masks.
    if (params.finetune.toString().toBoolean()) {
        FINETUNE(GATHER.out.gathered, ch_label_files, ch_batch_outputs, ch_all_slides, ch_models)
        ch_versions = ch_versions.mix(FINETUNE.out.versions)
    }
    CLASSIFY(GATHER.out.gathered, ch_classifiers.mix(TRAIN.out.classifiers), ch_label_files.ifEmpty([]))

    // The galleries show every gathered cell; with classifiers, a next round of labels can take
    // the most uncertain cells first (--page_order uncertainty; CLASSIFY always ranks). A run
    // that found no cells at all (e.g. -profile test's random checkpoints) skips them.
    ch_cells_to_show = GATHER.out.gathered.filter { gathered ->
        new groovy.json.JsonSlurper().parseText(gathered.resolve('gather.json').text).cells_kept > 0
    }
    ch_ranking = CLASSIFY.out.classified.map { classified -> classified.resolve('ranking.parquet') }
    PAGES(ch_cells_to_show, ch_ranking.ifEmpty([]))

    ch_results = GATHER.out.gathered
        .mix(
            ch_batch_outputs.flatten(),
            TRAIN.out.classifiers,
            CLASSIFY.out.classified
        )
        .collect(sort: { result -> result.name })
    REPORT(ch_results)

    ch_versions = ch_versions.mix(
        PLAN.out.versions,
        BATCH.out.versions,
        SEGMENT.out.versions,
        GATHER.out.versions,
        TRAIN.out.versions,
        CLASSIFY.out.versions,
        PAGES.out.versions,
        REPORT.out.versions
    )

    emit:
    gathered   = GATHER.out.gathered
    classified = CLASSIFY.out.classified
    site       = PAGES.out.site
    report     = REPORT.out.report
    versions   = ch_versions
}
