/*
 * The bmseg DAG and nothing else: which step feeds which. Every step is one process that calls
 * one `bmseg` command; resources, containers and flags live in conf/.
 *
 *   slides -> (CALIBRATE per modality) -> PLAN (per slide) -> BATCH -> SEGMENT (per batch) -> GATHER
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
    ch_slides      // channel: [ meta (id, pixel_size_um, modality), slide file ], one per slide
    calibrate      // boolean: one tissue threshold per modality (CALIBRATE) instead of per slide
    ch_models      // value channel: the models directory
    ch_classifiers // channel: a classifiers directory, or empty
    ch_labels      // channel: label JSON files, or empty

    main:
    ch_versions = channel.empty()
    // Each slide with its modality's calibration, or an empty list (PLAN's per-slide Otsu).
    ch_slides_to_plan = ch_slides.map { meta, slide -> [meta, slide, []] }
    if (calibrate) {
        // One CALIBRATE task per modality (a slide without one is read from its metadata, as
        // 'auto': calibrate-tissue refuses such a group if it mixes modalities). Each group's
        // slides sorted by slide id (ids are unique, names not), each with its own pixel size.
        ch_calibrate = ch_slides
            .map { meta, slide -> [meta.id, meta.modality ?: 'auto', meta.pixel_size_um, slide] }
            .collect(flat: false, sort: { entry -> entry[0] })
            .flatMap { entries ->
                entries.groupBy { entry -> entry[1] }.collect { modality, group ->
                    [modality, group.collect { entry -> entry[2] }.join(','), group.collect { entry -> entry[3] }]
                }
            }
        CALIBRATE(ch_calibrate)
        ch_slides_to_plan = ch_slides
            .map { meta, slide -> [meta.modality ?: 'auto', meta, slide] }
            .combine(CALIBRATE.out.calibration, by: 0)
            .map { modality, meta, slide, calibration -> [meta, slide, calibration] }
        ch_versions = ch_versions.mix(CALIBRATE.out.versions)
    }
    PLAN(ch_slides_to_plan)

    BATCH(PLAN.out.tiles.map { meta, tiles -> tiles }.collect(sort: { tiles -> tiles.name }))

    // Each slide beside its PLAN record (slide.json), by id.
    ch_slides_planned = ch_slides
        .map { meta, slide -> [meta.id, slide] }
        .join(PLAN.out.plan.map { meta, plan -> [meta.id, plan] }, failOnMismatch: true)

    // One SEGMENT task per batch table, keyed by its name (batch_0000, ...): a failed batch is
    // the only task a resumed run redoes. Each task stages only the slides its batch reads
    // (BATCH's batch_NNNN.slides.json), each with its id and slide.json, sorted by id: a task downloads no
    // other slide, and a changed slide redoes only the batches that read it. The ids go
    // comma-separated, in the order of the slides (--slide-ids).
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
            [batch_id, rows.collect { row -> row[0] }.join(','), rows.collect { row -> row[1] }, rows.collect { row -> row[2] }]
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
        // Every slide of the run, sorted by id, its id beside it (--slide-ids).
        ch_all_slides = ch_slides
            .map { meta, slide -> [meta.id, slide] }
            .collect(flat: false, sort: { entry -> entry[0] })
            .map { entries -> [entries.collect { entry -> entry[0] }.join(','), entries.collect { entry -> entry[1] }] }
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
